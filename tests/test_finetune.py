"""Your own images: any torchvision classifier fine-tuned on a folder of images, then exported, run
and benchmarked like the built-in models. Real images (MNIST and Fashion-MNIST written out as RGB
PNG class folders), small subsets, random or saved weights (nothing is downloaded)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferry.core.errors import FerryError
from ferry.models import tvmodels
from ferry.runtime import inputs
from ferry.train.finetune import CHECKPOINT_NAME, build, finetune, load_checkpoint, make_optimizer
from ferry.train.finetune_config import FinetuneConfig
from tests.conftest import assert_clean_error, read_meta, run_ferry

FASHION = Path(os.environ.get("FERRY_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="session")
def digit_folder(mnist_dir, tmp_path_factory) -> Path:
    """600 MNIST training digits and 200 test digits as RGB PNGs in train/<digit>/ and val/<digit>/."""
    from ferry.bench.datasets import write_class_folders

    root = tmp_path_factory.mktemp("digits")
    write_class_folders("mnist", mnist_dir / "MNIST" / "raw", root, train=600, test=200)
    return root


@pytest.fixture(scope="session")
def fashion_folder(tmp_path_factory) -> Path:
    if not any(FASHION.glob("train-images-idx3-ubyte*")):
        pytest.skip(f"Fashion-MNIST not at {FASHION} (Debian: apt-get install dataset-fashion-mnist; .ci/run installs it)")
    from ferry.bench.datasets import write_class_folders

    root = tmp_path_factory.mktemp("fashion")
    write_class_folders("fashion-mnist", FASHION, root, train=500, test=200)
    return root


def tiny(tmp_path: Path, data: Path, **kw) -> FinetuneConfig:
    base = dict(arch="resnet18", data_dir=str(data), out=str(tmp_path / "run"), weights="none", image_size=32,
                epochs=2, batch_size=32, workers=0, device="cpu", lr=2e-3)
    base.update(kw)
    return FinetuneConfig(**base)


def _write(folder: Path, n: int, value: int, size=(40, 40)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    for i in range(n):
        arr = np.clip(rng.normal(value, 20, (*size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")


def _two_classes_with_a_damaged_file_and_a_note(root: Path, n: int) -> Path:
    """`n` dark and `n` light 32x32 PNGs in two class folders, with a truncated PNG (dark/damaged.png)
    and a text file (light/notes.txt) among them."""
    _write(root / "dark", n, 40, (32, 32))
    _write(root / "light", n, 210, (32, 32))
    good = (root / "dark" / "000.png").read_bytes()
    (root / "dark" / "damaged.png").write_bytes(good[: len(good) // 2])
    (root / "light" / "notes.txt").write_text("a note, not an image")
    return root


def _interrupted_in_epoch_2(cfg: FinetuneConfig, monkeypatch) -> FinetuneConfig:
    """Run `cfg` until its second epoch starts, then as if Ctrl-C: its checkpoint holds epoch 1."""
    import ferry.train.finetune as ft

    real = ft.train_one_epoch

    def dies_in_epoch_2(*args, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(ft, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, progress=False, log=quiet)
    monkeypatch.setattr(ft, "train_one_epoch", real)
    return cfg


def _same_weights(a: FinetuneConfig, b: FinetuneConfig) -> bool:
    wa = load_checkpoint(Path(a.out) / CHECKPOINT_NAME)["model"]
    wb = load_checkpoint(Path(b.out) / CHECKPOINT_NAME)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- the folder ----------------------------------------------------------------------------------

def test_scan_splits_stratified_and_skips_bad_files(tmp_path):
    root = tmp_path / "data"
    _write(root / "zebra", 20, 200)
    _write(root / "ant", 10, 50)
    (root / "ant" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "ant" / "empty.png").write_bytes(b"")
    (root / "ant" / "notes.txt").write_text("not an image: skipped and named like a damaged one")
    (root / ".hidden").mkdir()
    data = inputs.scan_class_folders(root, val_fraction=0.2)
    assert data.classes == ["ant", "zebra"]  # sorted folder names
    assert data.balance() == {"ant": {"train": 8, "val": 2}, "zebra": {"train": 16, "val": 4}}
    assert sorted(s.path for s in data.skipped) == ["ant/broken.jpg", "ant/empty.png", "ant/notes.txt"]
    assert "skipped 3 unreadable file(s)" in data.summary() and "ant/broken.jpg" in data.summary()
    assert "ant/notes.txt (not an image Pillow can read)" in data.summary()
    again = inputs.scan_class_folders(root, val_fraction=0.2)
    assert [s.path for s in again.val] == [s.path for s in data.val]  # a fixed split
    assert not {s.path for s in data.val} & {s.path for s in data.train}


def test_scan_uses_a_val_folder_when_there_is_one(tmp_path):
    root = tmp_path / "data"
    for c, v in (("cat", 30), ("dog", 220)):
        _write(root / "train" / c, 6, v)
        _write(root / "val" / c, 3, v + 1)
    data = inputs.scan_class_folders(root)
    assert data.val_source == "the val/ folder" and len(data.train) == 12 and len(data.val) == 6
    assert all(s.path.startswith("val/") for s in data.val)


@pytest.mark.parametrize("make, needle", [
    (lambda r: None, "is not a folder"),
    (lambda r: r.mkdir(), "no class folders"),
    (lambda r: _write(r / "only", 5, 10), "at least 2 classes"),
    (lambda r: ((r / "a").mkdir(parents=True), (r / "b").mkdir()), "no readable images"),
    (lambda r: (_write(r / "a", 5, 10), (r / "b").mkdir()), "class folder(s) with no readable images: b"),
])
def test_bad_folders_are_clear_errors(tmp_path, make, needle):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(FerryError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        inputs.scan_class_folders(root)
    assert_clean_error(run_ferry("train", "--arch", "resnet18", "--weights", "none", "--data-dir", str(root),
                                 "--out", str(tmp_path / "o")), needle)


def test_unknown_arch_and_weights_list_the_valid_ones(tmp_path):
    assert_clean_error(run_ferry("train", "--arch", "resnet-18", "--data-dir", str(tmp_path)),
                       "unknown architecture 'resnet-18' (did you mean resnet18", "mobilenet_v3_large")
    assert_clean_error(run_ferry("train", "--arch", "resnet18", "--weights", "IMAGENET9K", "--data-dir", str(tmp_path)),
                       "IMAGENET1K_V1, DEFAULT, or none")
    assert_clean_error(run_ferry("export", "convnet_tiny", "--weights", "none", "--out", str(tmp_path)),
                       "did you mean convnext_tiny")
    assert_clean_error(run_ferry("train", "--arch", "resnet18", "--channels", "4", "8", "8", "--data-dir", str(tmp_path)),
                       "--channels does not apply to --arch resnet18")


# --- the model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "squeezenet1_0"])
def test_any_architecture_gets_a_new_head(arch):
    model, head = tvmodels.create(arch, tvmodels.Weights("none"), num_classes=7)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    assert head and model.get_submodule(head) is not None


def test_preprocessing_comes_from_the_weights_transforms():
    w = tvmodels.resolve_weights("efficientnet_b0", "IMAGENET1K_V1")  # resolving a name downloads nothing
    spec = tvmodels.preprocess_spec("efficientnet_b0", w)
    t = w.enum.transforms()
    assert (spec.resize, spec.crop, spec.interpolation) == (t.resize_size[0], (t.crop_size[0],) * 2, "bicubic")
    small = tvmodels.preprocess_spec("efficientnet_b0", w, image_size=64)
    assert small.crop == (64, 64) and small.resize == round(64 * t.resize_size[0] / t.crop_size[0])


def test_saved_weights_frozen_warm_up_then_lower_backbone_lr(tmp_path, monkeypatch):
    """Starting from a state dict (the offline stand-in for pretrained weights): the first epoch
    trains only the new head (backbone weights and BatchNorm statistics unchanged), later epochs
    train everything, the backbone at --backbone-lr-factor of the head's rate."""
    from torchvision.models import resnet18

    import ferry.train.finetune as ft

    torch.manual_seed(3)
    weights_file = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights_file)
    root = tmp_path / "data"
    _write(root / "dark", 40, 40, (32, 32))
    _write(root / "light", 40, 210, (32, 32))
    cfg = tiny(tmp_path, root, weights=str(weights_file), epochs=2, frozen_epochs=1, batch_size=16)
    built = build(cfg, 2)
    groups = make_optimizer(built, cfg).param_groups
    assert {g["base_lr"] for g in groups if g["head"]} == {cfg.lr}
    assert [g["base_lr"] for g in groups if not g["head"]] == pytest.approx([cfg.lr * cfg.backbone_lr_factor] * 2)

    real, snapshots = ft.train_one_epoch, {}

    def spy(built, *args, epoch, **kwargs):
        loss = real(built, *args, epoch=epoch, **kwargs)
        snapshots[epoch] = {k: v.detach().clone() for k, v in built.model.state_dict().items()}
        return loss

    monkeypatch.setattr(ft, "train_one_epoch", spy)
    finetune(cfg, progress=False, log=quiet)
    original = torch.load(weights_file, weights_only=True)
    backbone = [k for k in original if not k.startswith("fc.")]
    assert all(torch.equal(snapshots[1][k], original[k]) for k in backbone)  # frozen, BN statistics included
    assert not torch.equal(snapshots[1]["fc.weight"], snapshots[2]["fc.weight"])
    assert not all(torch.equal(snapshots[2][k], original[k]) for k in backbone if k.endswith("weight"))


@pytest.mark.slow
def test_a_folder_with_a_damaged_file_and_a_non_image_trains_and_exports(tmp_path):
    """One reader for every room: `ferry train` skips and names a truncated PNG and a text file, and
    `ferry export` of that checkpoint (re-reading the same folder for its held-out check and int8
    calibration) skips and names them the same way instead of stopping; `ferry predict` on the folder
    reports the same reason for the same file and predicts the rest."""
    root = _two_classes_with_a_damaged_file_and_a_note(tmp_path / "data", 24)
    out = tmp_path / "run"
    trained = run_ferry("train", "--arch", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1",
                        "--batch-size", "8", "--workers", "0", "--quiet", "--data-dir", str(root), "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    assert "skipped 2 unreadable file(s)" in trained.stdout
    damaged = next(line for line in trained.stdout.splitlines() if "dark/damaged.png (" in line)
    reason = damaged.split("dark/damaged.png (", 1)[1].split(")", 1)[0]
    assert "truncated" in reason and "light/notes.txt (not an image Pillow can read)" in trained.stdout

    exported = run_ferry("export", "resnet18", "--checkpoint", str(out / CHECKPOINT_NAME), "--out", str(tmp_path / "m"),
                         "--int8", "--int8-max-drop", "100")
    assert exported.returncode == 0, exported.stderr
    assert f"dark/damaged.png ({reason}" in exported.stdout and "light/notes.txt (not an image Pillow can read)" in exported.stdout
    assert (tmp_path / "m" / "resnet18.int8.onnx").is_file()

    predicted = run_ferry("predict", str(tmp_path / "m" / "resnet18.onnx"), str(root / "dark"))
    assert predicted.returncode == 1 and predicted.stdout.count("predicted") == 24
    assert f"dark/damaged.png: {reason}" in predicted.stderr


def test_resume_skips_the_files_the_first_run_skipped(tmp_path, monkeypatch):
    """A resumed run trains on the files the first run trained on: it decodes the folder again and
    skips the same unreadable files (it used to list them for training and stop at the first one),
    and ends with the weights of an uninterrupted run."""
    root = _two_classes_with_a_damaged_file_and_a_note(tmp_path / "data", 20)
    straight = tiny(tmp_path, root, out=str(tmp_path / "straight"), batch_size=8)
    said: list[str] = []
    finetune(straight, progress=False, log=said.append)

    broken = _interrupted_in_epoch_2(dataclasses.replace(straight, out=str(tmp_path / "broken")), monkeypatch)
    resumed_said: list[str] = []
    finetune(broken, resume=True, progress=False, log=resumed_said.append)
    summary = next(line for line in said if line.startswith("40 images in 2 classes"))
    assert "skipped 2 unreadable file(s)" in summary
    assert summary.split(";")[0].split("(")[1].split(",")[0] in resumed_said[0]  # "36 train": the same count
    assert "skipped 2 unreadable file(s)" in resumed_said[0] and "dark/damaged.png" in resumed_said[0]
    assert _same_weights(straight, broken)


# --- the whole path on real images --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.mnist
def test_fine_tune_export_predict_and_bench_on_real_digits(digit_folder, tmp_path):
    cfg = tiny(tmp_path, digit_folder, epochs=3, hflip=False)
    metrics = finetune(cfg, progress=False, log=quiet)
    assert metrics["top1"] >= 0.6, metrics["top1"]  # 10 classes: chance is 10%
    assert metrics["val_images"] == 200 and set(metrics["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert np.array(metrics["confusion_matrix"]).sum() == 200
    out = Path(cfg.out)
    for png in ("curves.png", "confusion.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["data"]["balance"]["3"]["val"] == 20 and on_disk["machine"]["cpu_class"]

    state = load_checkpoint(out / CHECKPOINT_NAME)  # self-describing: export needs nothing else
    assert state["arch"] == "resnet18" and state["classes"] == [str(d) for d in range(10)]
    assert state["preprocess"]["crop"] == [32, 32] and len(state["data"]["val_files"]) == 200

    models = tmp_path / "models"
    proc = run_ferry("export", "resnet18", "--checkpoint", str(out / CHECKPOINT_NAME), "--out", str(models),
                     "--int8", "--fp16", "--name", "digits-r18")
    assert proc.returncode == 0, proc.stderr
    meta = read_meta(models / "digits-r18.onnx")
    held = meta["validation"]["held_out"]
    assert held["images"] == 200 and held["top1_identical"]  # ONNX top-1 == PyTorch on every held-out image
    assert held["onnx_accuracy"] == pytest.approx(metrics["top1"])
    assert meta["labels"] == state["classes"] and meta["source"]["fine_tuned"]
    int8 = read_meta(models / "digits-r18.int8.onnx")["accuracy_vs_fp32"]
    assert int8["images"] == 200 and int8["drop_pp"] <= 0.5

    some = sorted((digit_folder / "val" / "7").iterdir())[:3]
    pred = run_ferry("predict", str(models / "digits-r18.onnx"), *map(str, some), "--json", "-")
    assert pred.returncode == 0, pred.stderr
    labels = [r["label"] for r in json.loads(pred.stdout)["results"]]
    assert all(label in state["classes"] for label in labels) and labels.count("7") >= 2

    bench = run_ferry("bench", "--models-dir", str(models), "--models", "digits-r18", "--quick", "--backends",
                      "torch-eager-cpu", "ort-cpu-int8", "--out", str(tmp_path / "bench"))
    assert bench.returncode == 0, bench.stderr
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"torch-eager-cpu", "ort-cpu-int8"}


@pytest.mark.slow
def test_fine_tune_on_fashion_mnist_and_resume(fashion_folder, tmp_path, monkeypatch):
    """Fashion-MNIST photos (RGB): learns well above chance; a run interrupted after its first epoch
    and resumed ends with exactly the weights of an uninterrupted run."""
    straight = tiny(tmp_path, fashion_folder, out=str(tmp_path / "straight"), epochs=3)
    metrics = finetune(straight, progress=False, log=quiet)
    assert metrics["top1"] >= 0.5, metrics["top1"]

    broken = _interrupted_in_epoch_2(dataclasses.replace(straight, out=str(tmp_path / "broken")), monkeypatch)
    resumed = finetune(broken, resume=True, progress=False, log=quiet)
    assert _same_weights(straight, broken)
    assert resumed["top1"] == metrics["top1"]
    with pytest.raises(FerryError, match="different recipe.*lr"):
        finetune(dataclasses.replace(broken, lr=0.5), resume=True, progress=False, log=quiet)


def test_export_any_torchvision_classifier_by_name(tmp_path):
    proc = run_ferry("export", "mobilenet_v3_small", "--weights", "none", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    from ferry.runtime import Classifier

    meta = read_meta(tmp_path / "mobilenet_v3_small.onnx")
    assert meta["model"] == "mobilenet_v3_small" and len(meta["labels"]) == 1000 and meta["untrained"]
    assert meta["preprocess"]["resize"] == 256 and meta["source"]["arch"] == "mobilenet_v3_small"
    clf = Classifier.from_onnx(tmp_path / "mobilenet_v3_small.onnx", provider="cpu")
    assert len(clf.predict(np.zeros((300, 200, 3), np.uint8), top_k=3).top_k) == 3
