"""Export: validated, self-describing ONNX for the digit CNN and ResNet-50, plus int8/fp16 variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ferry.core.errors import FerryError
from ferry.export import onnx_export as ox
from ferry.export.models import load_resnet50
from ferry.export.pipeline import ExportOptions, export_model
from tests.conftest import assert_clean_error, run_ferry


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A DigitCNN(4, 8, 8) trained for 2 epochs on synthetic digits."""
    from ferry.train.trainer import train
    from tests.test_train import tiny_config, tiny_splits

    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(tmp, epochs=2)
    train(cfg, splits=tiny_splits(), progress=False, log=quiet)
    return Path(cfg.out) / "checkpoint.pt"


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory) -> Path:
    from tests.conftest import synthetic_digits, write_fake_mnist

    return write_fake_mnist(tmp_path_factory.mktemp("mnist"), synthetic_digits(600, seed=1), synthetic_digits(300, seed=3))


def test_cnn_export_validates_and_describes_itself(tmp_path, tiny_checkpoint, fake_mnist):
    opts = ExportOptions(model="mnist-cnn", out=str(tmp_path), checkpoint=str(tiny_checkpoint), data_dir=str(fake_mnist),
                         int8=True, fp16=True, int8_max_drop_pp=100.0, calib_images=200)
    result = export_model(opts, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist-cnn.fp16.onnx", "mnist-cnn.int8.onnx", "mnist-cnn.onnx"]

    proto = onnx.load(str(result.paths["fp32"]))
    assert proto.opset_import[0].version >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    meta = ox.read_metadata(result.paths["fp32"])
    assert meta["labels"] == [str(d) for d in range(10)]
    assert meta["preprocess"]["kind"] == "mnist" and meta["preprocess"]["mean"] == [0.1307]
    assert meta["untrained"] is False and meta["precision"] == "fp32"
    check = meta["validation"]["mnist_test"]
    assert check["top1_identical"] and check["images"] == 300
    assert check["onnx_accuracy"] == check["torch_accuracy"]
    assert meta["validation"]["random_inputs"]["max_abs_diff"] <= 1e-4

    # the dynamic batch dimension works at sizes never seen during export
    session = ort.InferenceSession(str(result.paths["fp32"]), providers=["CPUExecutionProvider"])
    for n in (1, 5, 33):
        assert session.run(None, {"input": np.zeros((n, 1, 28, 28), np.float32)})[0].shape == (n, 10)

    for precision in ("int8", "fp16"):
        vmeta = ox.read_metadata(result.paths[precision])
        assert vmeta["precision"] == precision
        vs = vmeta["accuracy_vs_fp32"]
        assert vs["fp32_accuracy"] == check["onnx_accuracy"] and 0 <= vs["accuracy"] <= 1
    int8 = onnx.load(str(result.paths["int8"]))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    fp16 = onnx.load(str(result.paths["fp16"]))
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int8_accuracy_loss_over_the_limit_is_an_error_and_leaves_nothing(tmp_path, tiny_checkpoint, fake_mnist):
    from ferry.export.variants import QuantizationAccuracyError

    opts = ExportOptions(model="mnist-cnn", out=str(tmp_path), checkpoint=str(tiny_checkpoint), data_dir=str(fake_mnist),
                         int8=True, int8_max_drop_pp=-1.0, calib_images=100)
    with pytest.raises(QuantizationAccuracyError, match="pp below fp32"):
        export_model(opts, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist-cnn.onnx"]  # fp32 was fine; no int8, no temp


def test_validation_catches_a_model_that_differs(tmp_path, tiny_checkpoint):
    from ferry.train.trainer import load_model

    model, _ = load_model(tiny_checkpoint)
    path = tmp_path / "m.onnx"
    ox.export_to_onnx(model, torch.zeros(1, 1, 28, 28), path)
    ox.compare_with_torch(path, model, [np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)], atol=1e-4)
    with torch.no_grad():
        model.classifier[-1].bias += 0.01
    with pytest.raises(ox.OutputValuesMismatch, match=r"max \|onnxruntime - PyTorch\| = 0.01.* > atol 0.0001"):
        ox.compare_with_torch(path, model, [np.zeros((2, 1, 28, 28), np.float32)], atol=1e-4)


def _no_onnx_left(folder: Path) -> None:
    if folder.exists():
        assert not [p.name for p in folder.iterdir()], list(folder.iterdir())


def test_cli_bad_inputs_are_clear_errors(tmp_path, tiny_checkpoint, fake_mnist):
    out = tmp_path / "out"
    cases = [
        (["export", "mnist-cnn", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)], "checkpoint not found"),
        (["export", "lenet", "--out", str(out)], "unknown model 'lenet'; choose one of mnist-cnn, resnet50"),
        (["export", "mnist-cnn", "--out", str(out)], "needs --checkpoint"),
        (["export", "resnet50", "--weights", "none", "--int8", "--out", str(out)], "--calib-dir"),
    ]
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    cases.append((["export", "mnist-cnn", "--checkpoint", str(corrupt), "--out", str(out), "--data-dir", str(fake_mnist)], "corrupt"))
    wrong_arch = tmp_path / "wrong.pt"
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["config"]["channels"] = [8, 8, 8]
    torch.save(state, wrong_arch)
    cases.append((["export", "mnist-cnn", "--checkpoint", str(wrong_arch), "--out", str(out), "--data-dir", str(fake_mnist)], "does not match DigitCNN"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases.append((["export", "mnist-cnn", "--checkpoint", str(tiny_checkpoint), "--out", str(a_file / "sub"), "--data-dir", str(fake_mnist)], "cannot"))
    empty = tmp_path / "empty_calib"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cases.append((["export", "resnet50", "--weights", "none", "--int8", "--calib-dir", str(empty), "--out", str(out)], "no usable images"))
    for args, needle in cases:
        assert_clean_error(run_ferry(*args), needle)
        _no_onnx_left(out)


def test_resnet_weights_download_failure_says_what_to_do(monkeypatch):
    import torchvision.models as tvm

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvm, "resnet50", offline)
    with pytest.raises(FerryError, match="--weights /path/to/resnet50-0676ba61.pth, or use --weights none"):
        load_resnet50("IMAGENET1K_V1")


def test_resnet_local_weights_file(tmp_path):
    from torchvision.models import resnet18, resnet50

    good = tmp_path / "r50.pth"
    torch.manual_seed(1)
    torch.save({"state_dict": resnet50().state_dict()}, good)
    loaded = load_resnet50(str(good))
    assert len(loaded.labels) == 1000 and loaded.labels[0] == "tench"
    assert loaded.preprocess["resize"] == 256 and not loaded.untrained
    wrong = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), wrong)
    with pytest.raises(FerryError, match="not a ResNet-50 state dict"):
        load_resnet50(str(wrong))
    with pytest.raises(FerryError, match="not one of IMAGENET1K_V1, IMAGENET1K_V2, none"):
        load_resnet50(str(tmp_path / "missing.pth"))


@pytest.mark.slow
def test_resnet50_random_weights_export_int8_runs(resnet_export):
    result = resnet_export
    meta = ox.read_metadata(result.paths["fp32"])
    assert meta["untrained"] is True and meta["weights"] == "none"
    assert len(meta["labels"]) == 1000 and meta["labels"][281] == "tabby"
    assert meta["preprocess"]["crop"] == [224, 224] and meta["preprocess"]["resize"] == 256
    assert meta["validation"]["random_inputs"]["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(result.paths["int8"]), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((2, 3, 224, 224), np.float32)})[0].shape == (2, 1000)
    assert ox.read_metadata(result.paths["int8"])["accuracy_vs_fp32"]["images"] > 0


@pytest.mark.mnist
@pytest.mark.slow
def test_real_mnist_export_keeps_accuracy(tmp_path, real_mnist_run, mnist_dir):
    """fp32 ONNX scores exactly the checkpoint's test accuracy; int8 within 0.1 pp (onnxruntime, 10,000 images)."""
    ckpt, metrics = real_mnist_run
    result = export_model(ExportOptions(model="mnist-cnn", out=str(tmp_path), checkpoint=str(ckpt), data_dir=str(mnist_dir),
                                        int8=True), log=quiet)
    fp32 = ox.read_metadata(result.paths["fp32"])["validation"]["mnist_test"]
    assert fp32["images"] == 10000 and fp32["onnx_accuracy"] == metrics["test_accuracy"]
    int8 = ox.read_metadata(result.paths["int8"])["accuracy_vs_fp32"]
    assert int8["drop_pp"] <= 0.1
