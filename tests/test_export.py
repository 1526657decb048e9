"""Export: validated, self-describing ONNX for the digit CNN and ResNet-50, plus int8/fp16 variants."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ferry.core.errors import FerryError
from ferry.export import onnx_export as ox
from ferry.export.models import load_torchvision
from ferry.export.pipeline import ExportOptions, export_model
from tests.conftest import assert_clean_error, read_meta, run_ferry


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
    # 300 test images: one image is 0.33 pp, so a 1 pp gate allows 3 changed answers
    opts = ExportOptions(model="mnist-cnn", out=str(tmp_path), checkpoint=str(tiny_checkpoint), data_dir=str(fake_mnist),
                         int8=True, fp16=True, int8_max_drop_pp=1.0, calib_images=200)
    result = export_model(opts, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist-cnn.fp16.onnx", "mnist-cnn.int8.onnx", "mnist-cnn.onnx"]

    proto = onnx.load(str(result.paths["fp32"]))
    assert proto.opset_import[0].version >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    meta = read_meta(result.paths["fp32"])
    assert meta["labels"] == [str(d) for d in range(10)]
    assert meta["preprocess"]["kind"] == "mnist" and meta["preprocess"]["mean"] == [0.1307]
    assert meta["untrained"] is False and meta["precision"] == "fp32"
    check = meta["validation"]["held_out"]
    assert check["top1_identical"] and check["images"] == 300 and check["dataset"].startswith("MNIST test")
    assert check["onnx_accuracy"] == check["torch_accuracy"] >= 0.9
    assert meta["validated_on"]["cpu_class"] and meta["validated_on"]["onnxruntime_threads"] >= 1
    assert meta["validation"]["random_inputs"]["max_abs_diff"] <= 1e-4
    # trained pool-first, exported in the layout onnxruntime fuses (DigitCNN.inference_order), checked above
    assert meta["source"]["layer_order"] == "Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d"
    ops = [n.op_type for n in proto.graph.node if n.op_type in ("Conv", "MaxPool", "Relu")]
    assert ops[:3] == ["Conv", "Relu", "MaxPool"], ops

    # the dynamic batch dimension works at sizes never seen during export
    session = ort.InferenceSession(str(result.paths["fp32"]), providers=["CPUExecutionProvider"])
    for n in (1, 5, 33):
        assert session.run(None, {"input": np.zeros((n, 1, 28, 28), np.float32)})[0].shape == (n, 10)

    fp32_sha = hashlib.sha256(result.paths["fp32"].read_bytes()).hexdigest()
    for precision in ("int8", "fp16"):
        vmeta = read_meta(result.paths[precision])
        assert vmeta["precision"] == precision
        assert vmeta["derived_from"] == {"file": "mnist-cnn.onnx", "sha256": fp32_sha}
        vs = vmeta["accuracy_vs_fp32"]
        assert vs["fp32_accuracy"] == check["onnx_accuracy"]
        assert vs["drop_pp"] <= 1.0 and vs["top1_agreement"] >= 0.97, vs
    assert read_meta(result.paths["int8"])["quantization"]["weights"].endswith("(reduce_range)")
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
    assert not list(tmp_path.iterdir())  # the set failed as a whole: not even its fp32 file, no staging folder


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
        (["export", "lenet", "--out", str(out)], "unknown architecture 'lenet'"),
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
    empty_ckpt = tmp_path / "empty.pt"
    empty_ckpt.write_bytes(b"")
    random_ckpt = tmp_path / "random.pt"
    random_ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    common = ["--out", str(out), "--data-dir", str(fake_mnist)]
    cases += [
        (["export", "mnist-cnn", "--checkpoint", str(empty_ckpt), *common], "is an empty file"),  # was an IndexError
        (["export", "mnist-cnn", "--checkpoint", str(random_ckpt), *common], "never runs code from a checkpoint"),
        (["export", "mnist-cnn", "--checkpoint", str(tmp_path), *common], "is a folder"),
        (["export", "mnist-cnn", "--checkpoint", str(tiny_checkpoint), "--atol", "-1", *common], "--atol must be > 0"),
        # an opset the exporter cannot write: it fell back to 18 with a warning, and the metadata said 99999
        (["export", "mnist-cnn", "--checkpoint", str(tiny_checkpoint), "--opset", "99999", *common], "--opset must be 17 to"),
        # NaN turned the int8 gate off (no drop is > NaN)
        (["export", "mnist-cnn", "--checkpoint", str(tiny_checkpoint), "--int8", "--int8-max-drop", "nan", *common],
         "--int8-max-drop must be >= 0 (got nan)"),
        # a detector's gate is fixed (mAP points): the option was ignored silently
        (["export", "fcos_small", "--weights", "none", "--int8-max-drop", "5", "--out", str(out)],
         "--int8-max-drop is for classifiers; a detector's int8 and fp16 files are gated at 0.5 mAP points"),
        (["export", "fcos_small", "--weights", "none", "--atol", "1", "--out", str(out)],
         "--atol is for classifiers; a detector's boxes are checked against PyTorch's within 0.5 px"),
    ]
    for args, needle in cases:
        proc = run_ferry(*args)
        assert_clean_error(proc, needle)
        assert "weights_only" not in proc.stderr  # torch's advice to load unsafely is not passed on
        _no_onnx_left(out)


def test_triton_options_are_checked_before_anything_is_exported(tmp_path, tiny_checkpoint, fake_mnist):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mnist-cnn.onnx").write_bytes(b"the previous export")
    common = ["export", "mnist-cnn", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--data-dir", str(fake_mnist),
              "--triton-repo", str(tmp_path / "triton")]
    for extra, needle in ((["--triton-max-batch", "0"], "--triton-max-batch must be >= 1"),
                          (["--triton-precision", "int8"], "export it too (--int8)"),
                          (["--triton-precision", "fp16"], "export it too (--fp16)")):
        proc = run_ferry(*common, *extra)
        assert_clean_error(proc, needle)
        assert "exporting" not in proc.stdout and (out / "mnist-cnn.onnx").read_bytes() == b"the previous export"


def test_resnet_weights_download_failure_says_what_to_do(monkeypatch):
    import torchvision.models as tvm

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvm, "get_model", offline)
    with pytest.raises(FerryError, match="--weights /path/to/resnet50-0676ba61.pth .*or use --weights none"):
        load_torchvision("resnet50", "IMAGENET1K_V1")


def test_resnet_local_weights_file(tmp_path):
    from torchvision.models import resnet18, resnet50

    good = tmp_path / "r50.pth"
    torch.manual_seed(1)
    torch.save({"state_dict": resnet50().state_dict()}, good)
    loaded = load_torchvision("resnet50", str(good))
    assert len(loaded.labels) == 1000 and loaded.labels[0] == "tench"
    # a file does not say which weights it holds: the architecture's DEFAULT weights' preprocessing
    assert loaded.preprocess.resize == 232 and loaded.preprocess.crop == (224, 224) and not loaded.untrained
    assert loaded.weights.startswith("file r50.pth (sha256 ")
    state = torch.load(good, weights_only=True)["state_dict"]
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in state.items())
    wrong = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), wrong)
    with pytest.raises(FerryError, match="not a resnet50 state dict"):
        load_torchvision("resnet50", str(wrong))
    with pytest.raises(FerryError, match="not a file, nor one of resnet50's weights: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        load_torchvision("resnet50", str(tmp_path / "missing.pth"))


@pytest.mark.slow
def test_resnet50_random_weights_export_int8_runs(resnet_export):
    result = resnet_export
    meta = read_meta(result.paths["fp32"])
    assert meta["untrained"] is True and meta["weights"] == "none"
    # ImageNet's classes as people say them (imagenet-simple-labels, as the seed printed them), with
    # torchvision's own names kept beside them
    assert len(meta["labels"]) == 1000 and meta["labels"][281] == "tabby cat"
    assert meta["labels"][268] == "Mexican hairless dog" and meta["labels"][340] == "zebra"
    assert meta["original_labels"][268] == "Mexican hairless" and meta["original_labels"][281] == "tabby"
    assert meta["labels_source"].startswith("imagenet-simple-labels")
    assert meta["preprocess"]["crop"] == [224, 224] and meta["preprocess"]["resize"] == 232  # DEFAULT = V2
    assert meta["validation"]["random_inputs"]["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(result.paths["int8"]), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((2, 3, 224, 224), np.float32)})[0].shape == (2, 1000)
    assert read_meta(result.paths["int8"])["accuracy_vs_fp32"]["images"] > 0


@pytest.mark.mnist
@pytest.mark.slow
def test_real_mnist_export_keeps_accuracy(tmp_path, real_mnist_run, mnist_dir):
    """fp32 ONNX scores exactly the checkpoint's test accuracy; int8 within 0.1 pp (onnxruntime, 10,000 images)."""
    ckpt, metrics = real_mnist_run
    result = export_model(ExportOptions(model="mnist-cnn", out=str(tmp_path), checkpoint=str(ckpt), data_dir=str(mnist_dir),
                                        int8=True), log=quiet)
    fp32 = read_meta(result.paths["fp32"])["validation"]["held_out"]
    assert fp32["images"] == 10000 and fp32["onnx_accuracy"] == metrics["test_accuracy"]
    int8 = read_meta(result.paths["int8"])["accuracy_vs_fp32"]
    assert int8["drop_pp"] <= 0.1


# --- a model set is coherent ------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_export_leaves_the_previous_set_intact(tmp_path, tiny_checkpoint, fake_mnist, monkeypatch):
    out = tmp_path / "models"
    good = ExportOptions(model="mnist-cnn", out=str(out), checkpoint=str(tiny_checkpoint), data_dir=str(fake_mnist),
                         int8=True, fp16=True, int8_max_drop_pp=1.0, calib_images=100)
    export_model(good, log=quiet)
    before = _snapshot(out)
    assert sorted(before) == ["mnist-cnn.fp16.onnx", "mnist-cnn.int8.onnx", "mnist-cnn.onnx"]

    # fails in the int8 gate, after a new fp32 file was made
    from ferry.export.variants import QuantizationAccuracyError

    with pytest.raises(QuantizationAccuracyError):
        export_model(dataclasses.replace(good, int8_max_drop_pp=-1.0), log=quiet)
    assert _snapshot(out) == before

    # fails in fp16, after fp32 and int8 passed
    import ferry.export.variants as variants

    def broken_fp16(*args, **kwargs):
        raise ox.ExportError("fp16 conversion failed: simulated")

    monkeypatch.setattr(variants, "make_fp16", broken_fp16)
    with pytest.raises(ox.ExportError, match="simulated"):
        export_model(good, log=quiet)
    assert _snapshot(out) == before  # no new fp32 or int8 beside the old fp16, no staging folder


def test_export_without_variants_removes_the_stale_ones(tmp_path, tiny_checkpoint, fake_mnist):
    out = tmp_path / "models"
    opts = ExportOptions(model="mnist-cnn", out=str(out), checkpoint=str(tiny_checkpoint), data_dir=str(fake_mnist),
                         int8=True, fp16=True, int8_max_drop_pp=1.0, calib_images=100)
    export_model(opts, log=quiet)
    logged: list[str] = []
    export_model(dataclasses.replace(opts, int8=False, fp16=False), log=logged.append)
    assert sorted(p.name for p in out.iterdir()) == ["mnist-cnn.onnx"]
    assert sum("removed" in m and "now replaced" in m for m in logged) == 2


def test_runtime_and_bench_refuse_a_variant_whose_fp32_changed(tmp_path, tiny_checkpoint, fake_mnist):
    from ferry.bench import matrix
    from ferry.bench.backends import prepare_ort
    from ferry.runtime import Classifier
    from ferry.runtime.contract import IncoherentModelSet

    out = tmp_path / "models"
    opts = ExportOptions(model="mnist-cnn", out=str(out), checkpoint=str(tiny_checkpoint), data_dir=str(fake_mnist),
                         int8=True, int8_max_drop_pp=1.0, calib_images=100)
    export_model(opts, log=quiet)
    Classifier.from_onnx(out / "mnist-cnn.int8.onnx", provider="cpu")  # coherent: loads
    old_int8 = (out / "mnist-cnn.int8.onnx").read_bytes()
    export_model(dataclasses.replace(opts, int8=False), log=quiet)  # a new fp32 (new export time)
    (out / "mnist-cnn.int8.onnx").write_bytes(old_int8)  # someone copies the old int8 back beside it
    with pytest.raises(IncoherentModelSet, match="stale"):
        Classifier.from_onnx(out / "mnist-cnn.int8.onnx", provider="cpu")
    with pytest.raises(IncoherentModelSet):
        prepare_ort(matrix.BACKENDS["ort-cpu-int8"], "mnist-cnn", out, threads=1)
    proc = run_ferry("predict", str(out / "mnist-cnn.int8.onnx"), str(tmp_path))
    assert_clean_error(proc, "stale")
    # deployed alone (no fp32 beside it), a variant loads
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "mnist-cnn.int8.onnx").write_bytes(old_int8)
    Classifier.from_onnx(alone / "mnist-cnn.int8.onnx", provider="cpu")


def test_unavailable_weights_exit_3_and_other_failures_exit_2(monkeypatch, tmp_path, capsys):
    import torchvision.models as tvm

    from ferry.cli import main

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvm, "get_model", offline)
    assert main(["export", "resnet50", "--weights", "IMAGENET1K_V2", "--out", str(tmp_path / "m")]) == 3
    assert "Offline?" in capsys.readouterr().err

    def corrupt_cache(*args, **kwargs):
        raise RuntimeError("invalid hash value (expected 0676ba61, got 12345678)")

    monkeypatch.setattr(tvm, "get_model", corrupt_cache)
    # a broken cached file is not mistaken for "offline" (no fallback to random weights)
    assert main(["export", "resnet50", "--weights", "IMAGENET1K_V2", "--out", str(tmp_path / "m")]) == 2
    assert "invalid hash" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["export", "resnet50", "--weights", "none", "--int8", "--out", str(tmp_path / "m"),
                 "--calib-dir", str(tmp_path / "missing")]) == 2


def test_few_calibration_images_are_flagged_and_agreement_uses_held_out_ones(tmp_path):
    from PIL import Image

    from ferry.export.images import load_calibration_folder
    from ferry.runtime.presets import imagenet_spec

    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    data = load_calibration_folder(folder, imagenet_spec(resize=64, crop=56))
    assert len(data.calibration) == 8 and len(data.evaluation) == 2
    held = {tuple(x.ravel()[:8]) for x in data.evaluation.x}
    assert not held & {tuple(x.ravel()[:8]) for x in data.calibration}  # never calibrated on
    assert any("only 8 calibration image(s)" in n for n in data.notes)
    assert any("skipped 1 unreadable" in n and "broken.jpg" in n for n in data.notes)


@pytest.mark.parametrize("count, calibrated, held", [(1, 1, 0), (2, 1, 1), (3, 2, 1), (4, 3, 1), (5, 4, 1)])
def test_a_handful_of_calibration_images_still_keeps_one_out(tmp_path, count, calibrated, held):
    from PIL import Image

    from ferry.export.images import load_calibration_folder
    from ferry.runtime.presets import imagenet_spec

    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = load_calibration_folder(tmp_path, imagenet_spec(resize=40, crop=32))
    evaluated = 0 if data.evaluation is None else len(data.evaluation)  # None: nothing left to hold out
    assert (len(data.calibration), evaluated) == (calibrated, held)


@pytest.mark.slow
@pytest.mark.mnist
def test_int8_gives_the_same_answers_on_an_avx2_cpu_without_vnni(real_mnist_run, mnist_dir, tmp_path):
    """The int8 file ferry writes, run on this CPU and on an emulated AMD Zen 3 (QEMU's EPYC-Milan:
    AVX2, no AVX-512, no VNNI, so onnxruntime picks its VPMADDUBSW kernels): the same top-1 on 500
    MNIST test images. (Without reduce_range, U8S8 changes answers there: see ferry.bench.int8_portability.)"""
    import shutil

    if not shutil.which("qemu-x86_64"):
        pytest.skip("needs qemu-x86_64 (Debian: apt-get install qemu-user; .ci/run installs it)")
    from ferry.bench.int8_portability import emulated_logits
    from ferry.core.idx import read_mnist
    from ferry.export.digits import prepare_digits

    ckpt, _ = real_mnist_run
    result = export_model(ExportOptions(model="mnist-cnn", out=str(tmp_path), checkpoint=str(ckpt), data_dir=str(mnist_dir),
                                        int8=True), log=quiet)
    x, _ = read_mnist(mnist_dir, "t10k")
    xs = prepare_digits(x[:500])
    np.save(tmp_path / "x.npy", xs)
    native = ox.run_batched(ox.cpu_session(result.paths["int8"]), xs)
    avx2 = emulated_logits(str(result.paths["int8"]), str(tmp_path / "x.npy"), "EPYC-Milan")
    assert (native.argmax(1) == avx2.argmax(1)).all()
    assert np.abs(native - avx2).max() < 1e-3
