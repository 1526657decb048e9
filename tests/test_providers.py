"""Provider selection without a GPU: a fake onnxruntime stands in for the CUDA cases. What runs
where is read back from the session and from onnxruntime's profile, never assumed."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from ferry.runtime.classifier import Classifier
from ferry.runtime.providers import (
    ProviderError,
    check_single_ort,
    create_session,
    node_placement,
    profile_placement,
)


class _Dist:
    def __init__(self, name, where="/site-packages"):
        self.metadata = {"Name": name}
        self._where = where

    def locate_file(self, _path):
        return Path(self._where)


def one_ort():
    return [_Dist("onnxruntime"), _Dist("numpy")]


def fake_ort(*, available, starts: tuple[str, ...] = (), cuda_raises: bool = False, cpu_ops: tuple[str, ...] = ()):
    """An onnxruntime look-alike: sessions really run on the CPU underneath. A GPU provider listed
    in `starts` is reported by the session (as a working GPU would be); any other GPU provider is
    silently dropped, as onnxruntime does when one fails to initialise. The profile of a 'GPU'
    session places every node on the first GPU provider except the op types in `cpu_ops`."""
    calls = []

    class Session:
        def __init__(self, path, sess_options=None, providers=()):
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            calls.append(names)
            if "CUDAExecutionProvider" in names and cuda_raises:
                raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
            self._real = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            self._path = path
            self._providers = [n for n in names if n in starts] + ["CPUExecutionProvider"]
            self._profile = Path(sess_options.profile_file_prefix + ".json") if sess_options.enable_profiling else None
            self.options = sess_options
            self.bindings = 0

        def get_providers(self):
            return list(self._providers)

        def get_session_options(self):
            return self.options

        def end_profiling(self):
            events = []
            for node in _graph_ops(self._path):
                provider = "CPUExecutionProvider" if node[1] in cpu_ops else self._providers[0]
                events.append({"cat": "Node", "name": f"{node[0]}_kernel_time",
                               "args": {"op_name": node[1], "provider": provider}})
            self._profile.write_text(json.dumps(events))
            return str(self._profile)

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


def _graph_ops(path) -> list[tuple[str, str]]:
    import onnx

    return [(n.name or f"node{i}", n.op_type) for i, n in enumerate(onnx.load(path).graph.node)]


GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CUDA = ("CUDAExecutionProvider",)


def test_cuda_listed_but_failing_is_an_error_when_asked_for(cnn_export):
    path, _ = cnn_export
    ort, _ = fake_ort(available=GPU_BUILD)
    with pytest.raises(ProviderError, match="--provider cuda cannot run: .*CUDA/cuDNN libraries not found"):
        create_session(path, "cuda", ort=ort, distributions=one_ort)
    ort, _ = fake_ort(available=GPU_BUILD, cuda_raises=True)
    with pytest.raises(ProviderError, match="no CUDA-capable device"):
        create_session(path, "cuda", ort=ort, distributions=one_ort)


def test_auto_falls_back_to_cpu_and_says_why(cnn_export):
    path, _ = cnn_export
    ort, _ = fake_ort(available=GPU_BUILD)
    session, info = create_session(path, "auto", ort=ort, distributions=one_ort)
    assert info.used == "CPUExecutionProvider" and not info.is_gpu
    assert "CUDA not used" in info.note and "CPUExecutionProvider" in info.describe()


def test_cuda_absent_names_the_cpu_build(cnn_export):
    path, _ = cnn_export
    ort, _ = fake_ort(available=["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="is the CPU build.*onnxruntime-gpu"):
        create_session(path, "cuda", ort=ort, distributions=one_ort)
    with pytest.raises(ProviderError, match="tensorrt cannot run"):
        create_session(path, "tensorrt", ort=ort, distributions=one_ort)
    _, info = create_session(path, "auto", ort=ort, distributions=one_ort)
    assert info.used == "CPUExecutionProvider" and "CPU build" in info.note


def test_working_cuda_is_read_back_placed_and_uses_io_binding(cnn_export):
    path, _ = cnn_export
    ort, calls = fake_ort(available=GPU_BUILD, starts=CUDA)
    clf = Classifier.from_onnx(path, provider="cuda", threads=1, ort=ort, distributions=one_ort)
    assert clf.provider.used == "CUDAExecutionProvider" and clf.provider.is_gpu
    assert calls[-1][0] == "CUDAExecutionProvider"
    placement = clf.provider.placement
    assert placement["by_provider"] == {"CUDAExecutionProvider": placement["nodes"]} and placement["nodes"] >= 5
    assert clf.provider.threads == 1
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:16] = 255
    pred = clf.predict(img)
    assert pred.provider == "CUDAExecutionProvider" and clf.session.bindings == 1
    cpu = Classifier.from_onnx(path, provider="cpu")
    assert cpu.predict(img).index == pred.index


def test_heavy_nodes_on_the_cpu_under_an_explicit_gpu_request_are_an_error(cnn_export):
    path, _ = cnn_export
    ort, _ = fake_ort(available=GPU_BUILD, starts=CUDA, cpu_ops=("Conv",))
    with pytest.raises(ProviderError, match="placed Conv nodes on the CPU"):
        create_session(path, "cuda", ort=ort, distributions=one_ort)
    # small nodes on the CPU are reported, not refused; `auto` reports heavy ones in its note
    ort, _ = fake_ort(available=GPU_BUILD, starts=CUDA, cpu_ops=("Relu",))
    _, info = create_session(path, "cuda", ort=ort, distributions=one_ort)
    assert "Relu" in info.placement["cpu_nodes"] and "small nodes on the CPU: Relu" in info.describe()
    ort, _ = fake_ort(available=GPU_BUILD, starts=CUDA, cpu_ops=("Gemm",))
    _, info = create_session(path, "auto", ort=ort, distributions=one_ort)
    assert info.used == "CUDAExecutionProvider" and "heavy nodes on the CPU: Gemm" in info.note


def test_tensorrt_that_ends_up_on_cuda_is_an_error(cnn_export):
    path, _ = cnn_export
    ort, calls = fake_ort(available=GPU_BUILD, starts=CUDA)  # TensorRT silently dropped, CUDA starts
    with pytest.raises(ProviderError, match="--provider tensorrt cannot run: TensorRT did not start.*fell back to CUDA"):
        create_session(path, "tensorrt", ort=ort, distributions=one_ort)
    assert calls[-1][:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    ort, _ = fake_ort(available=GPU_BUILD, starts=("TensorrtExecutionProvider", "CUDAExecutionProvider"))
    _, info = create_session(path, "tensorrt", ort=ort, distributions=one_ort)
    assert info.used == "TensorrtExecutionProvider"


def test_placement_is_read_from_a_real_onnxruntime_profile(cnn_export, tmp_path):
    """The parser against onnxruntime's own profile format (a real CPU session)."""
    path, _ = cnn_export
    opts = onnxruntime.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "p")
    session = onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    placement = profile_placement(session)
    assert placement["nodes"] >= 5 and placement["by_provider"] == {"CPUExecutionProvider": placement["nodes"]}
    assert "Conv" in placement["cpu_nodes"] or "FusedConv" in placement["cpu_nodes"]
    assert not list(tmp_path.glob("p*.json"))  # the trace file is removed
    assert node_placement([{"cat": "Session", "name": "x"}]) == {"nodes": 0, "by_provider": {}, "cpu_nodes": []}


def test_both_ort_packages_in_one_folder_is_detected(cnn_export):
    both = lambda: [_Dist("onnxruntime"), _Dist("onnxruntime-gpu")]  # noqa: E731
    with pytest.raises(ProviderError, match="onnxruntime and onnxruntime-gpu are installed together.*pip uninstall -y"):
        check_single_ort(both)
    with pytest.raises(ProviderError, match="installed together"):
        create_session(cnn_export[0], "cpu", distributions=both)
    check_single_ort(one_ort)
    # in two folders (onnxruntime-gpu installed with --target ahead of a system onnxruntime), nothing
    # is overwritten: the first on sys.path wins and the provider read-back tells which one ran
    apart = lambda: [_Dist("onnxruntime", "/usr/lib/site"), _Dist("onnxruntime-gpu", "/tmp/site")]  # noqa: E731
    check_single_ort(apart)


def test_unknown_provider_and_bad_threads(cnn_export):
    with pytest.raises(ProviderError, match="choose one of auto, cpu, cuda, tensorrt"):
        create_session(cnn_export[0], "rocm")
    with pytest.raises(ProviderError, match="threads must be >= 1"):
        create_session(cnn_export[0], "cpu", threads=0)


def test_threads_are_read_back_from_the_session(cnn_export):
    from ferry.core.machine import physical_cores

    _, info = create_session(cnn_export[0], "cpu", threads=1)
    assert info.threads == 1
    _, info = create_session(cnn_export[0], "cpu")
    assert info.threads == physical_cores() >= 1
