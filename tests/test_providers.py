"""Provider selection without a GPU: a fake onnxruntime stands in for the CUDA cases."""

from __future__ import annotations

import types

import numpy as np
import onnxruntime
import pytest

from ferry.runtime.classifier import Classifier
from ferry.runtime.providers import ProviderError, check_single_ort, create_session


class _Dist:
    def __init__(self, name):
        self.metadata = {"Name": name}


def one_ort():
    return [_Dist("onnxruntime"), _Dist("numpy")]


def fake_ort(*, available, cuda_starts: bool, cuda_raises: bool = False):
    """An onnxruntime look-alike: CPU sessions are real; a CUDA session either 'starts' (reports
    CUDA first, runs on the CPU underneath, supports IO binding) or is silently dropped by ORT."""
    calls = []

    class Session:
        def __init__(self, path, sess_options=None, providers=()):
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            calls.append(names)
            if "CUDAExecutionProvider" in names and cuda_raises:
                raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
            self._real = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            gpu = [n for n in names if n != "CPUExecutionProvider"]
            self._providers = (gpu[:1] if (gpu and cuda_starts) else []) + ["CPUExecutionProvider"]
            self.bindings = 0

        def get_providers(self):
            return list(self._providers)

        def __getattr__(self, name):
            return getattr(self._real, name)

        def io_binding(self):
            self.bindings += 1
            session = self

            class Binding:
                def bind_cpu_input(self, name, arr):
                    self.feed = {name: arr}

                def bind_output(self, name, device):
                    assert device == "cuda"
                    self.name = name

                def copy_outputs_to_cpu(self):
                    return self.out

            b = Binding()
            session.run_with_iobinding = lambda binding: setattr(binding, "out", session._real.run(None, binding.feed))
            return b

    module = types.SimpleNamespace(
        __version__="9.9.9-fake",
        SessionOptions=onnxruntime.SessionOptions,
        InferenceSession=Session,
        get_available_providers=lambda: list(available),
        preload_dlls=lambda: None,
    )
    return module, calls


GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cuda_listed_but_failing_is_an_error_when_asked_for(cnn_export):
    path, _ = cnn_export
    ort, _ = fake_ort(available=GPU_BUILD, cuda_starts=False)
    with pytest.raises(ProviderError, match="--provider cuda cannot run: .*CUDA/cuDNN libraries not found"):
        create_session(path, "cuda", ort=ort, distributions=one_ort)
    ort, _ = fake_ort(available=GPU_BUILD, cuda_starts=False, cuda_raises=True)
    with pytest.raises(ProviderError, match="no CUDA-capable device"):
        create_session(path, "cuda", ort=ort, distributions=one_ort)


def test_auto_falls_back_to_cpu_and_says_why(cnn_export):
    path, _ = cnn_export
    ort, _ = fake_ort(available=GPU_BUILD, cuda_starts=False)
    session, info = create_session(path, "auto", ort=ort, distributions=one_ort)
    assert info.used == "CPUExecutionProvider" and not info.is_gpu
    assert "CUDA not used" in info.note and "CPUExecutionProvider" in info.describe()


def test_cuda_absent_names_the_cpu_build(cnn_export):
    path, _ = cnn_export
    ort, _ = fake_ort(available=["CPUExecutionProvider"], cuda_starts=False)
    with pytest.raises(ProviderError, match="is the CPU build.*onnxruntime-gpu"):
        create_session(path, "cuda", ort=ort, distributions=one_ort)
    with pytest.raises(ProviderError, match="tensorrt cannot run"):
        create_session(path, "tensorrt", ort=ort, distributions=one_ort)
    _, info = create_session(path, "auto", ort=ort, distributions=one_ort)
    assert info.used == "CPUExecutionProvider" and "CPU build" in info.note


def test_working_cuda_is_read_back_and_uses_io_binding(cnn_export):
    path, _ = cnn_export
    ort, calls = fake_ort(available=GPU_BUILD, cuda_starts=True)
    clf = Classifier.from_onnx(path, provider="cuda", ort=ort, distributions=one_ort)
    assert clf.provider.used == "CUDAExecutionProvider" and clf.provider.is_gpu
    assert calls[-1][0] == "CUDAExecutionProvider"
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:16] = 255
    pred = clf.predict(img)
    assert pred.provider == "CUDAExecutionProvider" and clf.session.bindings == 1
    cpu = Classifier.from_onnx(path, provider="cpu")
    assert cpu.predict(img).index == pred.index


def test_both_ort_packages_installed_is_detected(cnn_export):
    both = lambda: [_Dist("onnxruntime"), _Dist("onnxruntime-gpu")]  # noqa: E731
    with pytest.raises(ProviderError, match="onnxruntime and onnxruntime-gpu are installed together.*pip uninstall -y"):
        check_single_ort(both)
    with pytest.raises(ProviderError, match="installed together"):
        create_session(cnn_export[0], "cpu", distributions=both)
    check_single_ort(one_ort)


def test_unknown_provider(cnn_export):
    with pytest.raises(ProviderError, match="choose one of auto, cpu, cuda, tensorrt"):
        create_session(cnn_export[0], "rocm")
