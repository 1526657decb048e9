"""Training: shapes, learning, checkpoints, resume, determinism, CLI errors, and real MNIST accuracy."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ferry.core.errors import FerryError
from ferry.models.digit_cnn import DigitCNN
from ferry.train import data
from ferry.train.config import TrainConfig
from ferry.train.trainer import CHECKPOINT_NAME, load_checkpoint, load_model, lr_at, train
from tests.conftest import assert_clean_error, run_ferry, synthetic_digits


def tiny_splits(n_train: int = 640, n_val: int = 200, n_test: int = 200) -> data.MnistSplits:
    tx, ty = synthetic_digits(n_train, seed=1)
    vx, vy = synthetic_digits(n_val, seed=2)
    sx, sy = synthetic_digits(n_test, seed=3)
    t = torch.from_numpy
    return data.MnistSplits(t(tx), t(ty), t(vx), t(vy), t(sx), t(sy))


def tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    # synthetic digits: the class is where the block is, so no redrawing (it re-centres every image)
    base = dict(out=str(tmp_path / "run"), epochs=2, channels=(4, 8, 8), device="cpu", lr=0.05, seed=0, redraw=0.0)
    base.update(kw)
    return TrainConfig(**base)


def quiet(_msg: str) -> None:
    pass


def test_model_shapes():
    model = DigitCNN(channels=(4, 8, 16)).eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3 and convs[0].in_channels == 1
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 3
    with pytest.raises(ValueError):
        DigitCNN(channels=(4, 8))
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 3 * 3, 256), (256, 10)]  # the recipe's hidden layer
    plain = DigitCNN(channels=(4, 8, 16), hidden=0)
    assert [(m.in_features, m.out_features) for m in plain.classifier if isinstance(m, torch.nn.Linear)] == [(16 * 3 * 3, 10)]


def test_pooling_first_is_the_seeds_network_without_batch_norm():
    """conv -> pool -> ReLU (the fast order) computes exactly the seed's conv -> ReLU -> pool."""
    torch.manual_seed(0)
    fast = DigitCNN(channels=(4, 8, 16), batch_norm=False, dropout=0.0).eval()
    seed = DigitCNN(channels=(4, 8, 16), batch_norm=False, dropout=0.0, pool_first=False).eval()
    seed.load_state_dict(fast.state_dict())
    order = [type(m).__name__ for m in seed.features]
    assert order[:3] == ["Conv2d", "ReLU", "MaxPool2d"] and [type(m).__name__ for m in fast.features][:3] == ["Conv2d", "MaxPool2d", "ReLU"]
    x = torch.randn(5, 1, 28, 28)
    assert torch.allclose(fast(x), seed(x), atol=1e-6)


def test_inference_order_computes_what_was_trained():
    """Export moves BatchNorm and ReLU before pooling (what onnxruntime fuses): exact for positive
    BatchNorm scales; a negative scale does not commute with max-pooling, so the model stays as trained."""
    torch.manual_seed(0)
    model = DigitCNN(channels=(4, 8, 16))
    norms = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:  # trained-looking statistics
        bn.weight.data.uniform_(0.2, 2.0)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    fused = model.inference_order()
    assert [type(m).__name__ for m in fused.features[:4]] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert not fused.training
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-6)
    norms[1].weight.data[0] = -0.5
    assert model.inference_order() is model


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, peak=0.1, warmup=0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.005)
    assert max(lrs) == pytest.approx(0.1)
    assert int(np.argmax(lrs)) == 20
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


def test_augmentation_keeps_shape_and_background():
    x = data.to_unit(torch.from_numpy(synthetic_digits(8)[0]))
    for elastic in (0.0, 1.5):
        out = data.random_warp(x, torch.Generator().manual_seed(0), elastic_px=elastic)
        assert out.shape == x.shape and not torch.allclose(out, x)
        blank = data.random_warp(torch.zeros(2, 1, 28, 28), torch.Generator().manual_seed(0), elastic_px=elastic)
        assert torch.equal(blank, torch.zeros_like(blank))


def test_stroke_width_jitter_thickens_and_thins():
    bar = torch.zeros(400, 1, 28, 28)
    bar[:, :, 6:22, 12:15] = 1.0  # a 3-pixel-wide stroke
    out = data.stroke_width_jitter(bar, torch.Generator().manual_seed(0), p=1.0)
    ink = out.sum(dim=(1, 2, 3))
    base = bar[0].sum()
    assert (ink > base * 1.2).sum() > 150 and (ink < base * 0.85).sum() > 80  # thicker ones and thinner ones
    assert torch.allclose(data.stroke_width_jitter(bar, torch.Generator(), p=0.0), bar)
    assert out.shape == bar.shape and out.min() >= 0 and out.max() <= 1


def test_training_learns_and_writes_outputs(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3)
    metrics = train(cfg, splits=tiny_splits(), progress=False, log=quiet)
    losses = [r["train_loss"] for r in metrics["epochs"]]
    assert losses[-1] < losses[0] * 0.5, losses
    assert metrics["test_accuracy"] >= 0.9
    out = Path(cfg.out)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test_accuracy"] == metrics["test_accuracy"]
    assert {"train_seconds", "prepare_seconds", "device", "epochs"} <= on_disk.keys() and len(on_disk["epochs"]) == 3
    assert 0 <= on_disk["prepare_seconds"] < 60
    machine = on_disk["machine"]
    assert machine["cpu_class"] and isinstance(machine["cpu_flags"], list) and machine["torch_threads"] >= 1
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    train(cfg, splits=tiny_splits(), progress=False, log=quiet)
    model, loaded_cfg = load_model(Path(cfg.out) / CHECKPOINT_NAME)
    assert loaded_cfg == cfg
    x = data.normalize(tiny_splits().test_x[:16])
    state = load_checkpoint(Path(cfg.out) / CHECKPOINT_NAME)
    reference = DigitCNN(channels=cfg.channels, hidden=cfg.hidden).eval()
    reference.load_state_dict(state["model"])
    assert torch.equal(model(x), reference(x))
    assert state["epoch"] == 1 and len(state["history"]) == 1


def test_checkpoint_from_before_the_hidden_layer_loads_without_one(tmp_path):
    """Checkpoints written before `hidden` existed have no such key: they were trained without the layer."""
    cfg = tiny_config(tmp_path, epochs=1, hidden=0)
    train(cfg, splits=tiny_splits(), progress=False, log=quiet)
    path = Path(cfg.out) / CHECKPOINT_NAME
    state = load_checkpoint(path)
    del state["config"]["hidden"]
    torch.save(state, path)
    model, loaded_cfg = load_model(path)
    assert loaded_cfg.hidden == 0 and model.hidden == 0
    assert TrainConfig.from_dict(dataclasses.replace(cfg, hidden=256).to_dict()).hidden == 256  # a saved value wins


def _state(cfg: TrainConfig) -> dict:
    return load_checkpoint(Path(cfg.out) / CHECKPOINT_NAME)["model"]


def test_same_seed_same_result_and_other_seed_differs(tmp_path):
    a = tiny_config(tmp_path, out=str(tmp_path / "a"))
    b = dataclasses.replace(a, out=str(tmp_path / "b"))
    c = dataclasses.replace(a, out=str(tmp_path / "c"), seed=1)
    for cfg in (a, b, c):
        train(cfg, splits=tiny_splits(), progress=False, log=quiet)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    straight = tiny_config(tmp_path, out=str(tmp_path / "straight"), epochs=3)
    train(straight, splits=tiny_splits(), progress=False, log=quiet)

    interrupted = dataclasses.replace(straight, out=str(tmp_path / "interrupted"))
    import ferry.train.trainer as trainer

    real_epoch = trainer.train_one_epoch

    def dies_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt  # killed mid-epoch
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, splits=tiny_splits(), progress=False, log=quiet)
    assert load_checkpoint(Path(interrupted.out) / CHECKPOINT_NAME)["epoch"] == 1  # epoch 1 kept

    monkeypatch.setattr(trainer, "train_one_epoch", real_epoch)
    metrics = train(interrupted, resume=True, splits=tiny_splits(), progress=False, log=quiet)
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3]
    s1, s2 = _state(straight), _state(interrupted)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_resume_refuses_a_different_recipe(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    train(cfg, splits=tiny_splits(), progress=False, log=quiet)
    with pytest.raises(FerryError, match="different recipe.*lr"):
        train(dataclasses.replace(cfg, lr=0.5), resume=True, splits=tiny_splits(), progress=False, log=quiet)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FerryError, match="corrupt"):
        load_checkpoint(bad)
    torch.save({"some": "dict"}, bad)
    with pytest.raises(FerryError, match="not a ferry"):
        load_checkpoint(bad)
    torch.save({"format": "ferry.mnist-cnn/1", "model": {}, "config": {}, "epoch": 1, "history": []}, bad)
    with pytest.raises(FerryError, match="another version of ferry.*train it again"):  # the old layer order
        load_checkpoint(bad)


def test_idx_reader_rejects_truncated_file(tmp_path, fake_mnist_dir):
    raw = fake_mnist_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-100])
    with pytest.raises(FerryError, match="truncated"):
        data.load_mnist_arrays(fake_mnist_dir)


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    """A --data-dir without MNIST (a typo) tries torchvision's download; where it fails (no network
    here) the error says so, and the empty folders the downloader made are gone again (left, they
    looked like a data folder to later commands)."""
    import torchvision.datasets

    def offline(root, train=True, download=False):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does before fetching
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.delenv("FERRY_NO_DOWNLOAD", raising=False)
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    (tmp_path / "kept").mkdir()
    for given in (tmp_path / "typo", tmp_path / "kept"):
        with pytest.raises(FerryError, match="missing .* a download was tried and failed \\(RuntimeError\\)"):
            data.load_mnist_arrays(given, download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_config_validation_lists_every_problem():
    with pytest.raises(FerryError) as err:
        TrainConfig(epochs=0, lr=-1.0, batch_size=0).validate()
    assert "--epochs" in str(err.value) and "--lr" in str(err.value) and "--batch-size" in str(err.value)


# --- the CLI, as a user runs it -------------------------------------------------------------


def test_cli_dry_run_end_to_end(tmp_path, fake_mnist_dir):
    out = tmp_path / "out"
    proc = run_ferry("train", "--data-dir", str(fake_mnist_dir), "--out", str(out), "--dry-run", "--quiet", "--val-size", "100")
    assert proc.returncode == 0, proc.stderr
    assert "test_accuracy=" in proc.stdout
    assert {"checkpoint.pt", "metrics.json", "curves.png"} <= {p.name for p in out.iterdir()}


def test_cli_resume_continues(tmp_path, fake_mnist_dir):
    out = tmp_path / "out"
    common = ["--data-dir", str(fake_mnist_dir), "--out", str(out), "--quiet", "--val-size", "100", "--channels", "4", "8", "8"]
    first = run_ferry("train", *common, "--epochs", "1", "--train-limit", "256")
    assert first.returncode == 0, first.stderr
    # the recipe comes back from the checkpoint; a resumed complete run only re-evaluates
    again = run_ferry("train", "--resume", "--out", str(out), "--data-dir", str(fake_mnist_dir), "--quiet")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
    changed = run_ferry("train", "--resume", "--out", str(out), "--data-dir", str(fake_mnist_dir), "--lr", "0.3")
    assert_clean_error(changed, "different recipe")
    # a new run into the same --out replaces the trained model only when asked
    saved = (out / "checkpoint.pt").read_bytes()
    for extra in ([], ["--dry-run"]):
        assert_clean_error(run_ferry("train", *common, "--epochs", "1", *extra), "already holds a trained model", "--overwrite")
    assert (out / "checkpoint.pt").read_bytes() == saved
    assert_clean_error(run_ferry("train", *common, "--resume", "--overwrite"), "choose one")
    replaced = run_ferry("train", *common, "--epochs", "1", "--train-limit", "128", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "checkpoint.pt").read_bytes() != saved


def test_cli_out_that_cannot_hold_a_run_is_refused_before_training(tmp_path, fake_mnist_dir):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    proc = run_ferry("train", "--data-dir", str(fake_mnist_dir), "--out", str(afile), "--quiet")
    assert_clean_error(proc, "exists and is not a folder")
    assert "training" not in proc.stdout and afile.read_text() == "x"
    assert_clean_error(run_ferry("train", "--data-dir", str(fake_mnist_dir), "--out", str(afile / "run"), "--quiet"),
                       "cannot create --out")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--epochs", "0"], ["--epochs must be >= 1"]),
        (["--lr", "-0.1"], ["--lr must be > 0"]),
        (["--batch-size", "0", "--epochs", "0"], ["--batch-size", "--epochs"]),
        (["--device", "tpu"], ["auto, cpu, cuda"]),
    ],
)
def test_cli_rejects_nonsense_numbers(tmp_path, args, needles):
    assert_clean_error(run_ferry("train", "--out", str(tmp_path), *args), *needles)


def test_cli_missing_data_names_the_files(tmp_path):
    empty = tmp_path / "empty"
    (empty / "MNIST" / "raw").mkdir(parents=True)
    (empty / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")
    # FERRY_NO_DOWNLOAD keeps the test off the network even where it is reachable
    proc = run_ferry("train", "--data-dir", str(empty), "--out", str(tmp_path / "o"), env={"FERRY_NO_DOWNLOAD": "1"})
    assert_clean_error(proc, "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "--data-dir")


def test_cli_corrupt_checkpoint_on_resume(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    assert_clean_error(run_ferry("train", "--resume", "--out", str(tmp_path)), "corrupt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cli_cuda_without_cuda(tmp_path, fake_mnist_dir):
    proc = run_ferry("train", "--device", "cuda", "--data-dir", str(fake_mnist_dir), "--out", str(tmp_path))
    assert_clean_error(proc, "CUDA is not available")


def test_help_works_without_torch():
    # A meta-path hook makes `import torch` fail, as on a machine with only the runtime installed.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
        "            raise ImportError('torch blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from ferry.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
    )
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout


# --- real MNIST -----------------------------------------------------------------------------


@pytest.mark.mnist
@pytest.mark.slow
def test_short_run_on_real_mnist_reaches_floor(real_mnist_run):
    """One epoch on 12,000 real training images must reach >= 97% on the 10,000 official test images."""
    _, metrics = real_mnist_run
    assert metrics["test_images"] == 10000
    assert metrics["test_accuracy"] >= 0.97, metrics["test_accuracy"]


def test_killed_mid_epoch_then_resumed_loses_only_that_epoch(tmp_path, fake_mnist_dir):
    """SIGKILL a real `ferry train` after its first epoch is saved; --resume finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    out = tmp_path / "out"
    args = ["train", "--data-dir", str(fake_mnist_dir), "--out", str(out), "--quiet", "--val-size", "100",
            "--channels", "4", "8", "8", "--epochs", "40"]
    proc = subprocess.Popen([sys.executable, "-m", "ferry", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = out / CHECKPOINT_NAME
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.05)
    time.sleep(0.3)  # now somewhere inside a later epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(ckpt)["epoch"]  # readable: the kill never leaves a torn checkpoint
    assert 1 <= saved < 40
    done = run_ferry("train", "--resume", "--out", str(out), "--data-dir", str(fake_mnist_dir), "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"after epoch {saved}" in done.stdout
    history = load_checkpoint(ckpt)["history"]
    assert [r["epoch"] for r in history] == list(range(1, 41))


def test_redrawn_digits_are_framed_like_mnist():
    x = torch.zeros(3, 28, 28, dtype=torch.uint8)
    x[0, 2:8, 2:5] = 255  # small and in a corner
    x[1, 5:25, 10:14] = 255  # a tall bar
    x[2, 10:14, 3:25] = 255  # a wide bar
    framed = data.frame_like_mnist(data.to_unit(x))
    for img in framed[:, 0]:
        ys, xs = torch.nonzero(img > 0.3, as_tuple=True)
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert 18 <= extent <= 22
        com = (torch.stack(torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")) * img).sum((1, 2)) / img.sum()
        assert torch.allclose(com, torch.tensor([13.5, 13.5]), atol=0.75)
    skel = data.skeletons(x)
    assert skel.shape == (3, 56, 56) and skel.max() == 1  # traced at twice the resolution
    assert skel.sum() < (F.interpolate(x.float().unsqueeze(1), scale_factor=2) > 0).sum()  # thinner than the ink
    pen = data.pen_distances(x)
    assert pen.shape == (3, 56, 56) and pen.dtype == torch.uint8 and torch.equal(pen == 0, skel == 1)
    pens = data.redraw_with_pen(pen.unsqueeze(1).repeat(40, 1, 1, 1)[:40], torch.Generator().manual_seed(1))
    assert pens.shape == (40, 1, 28, 28)
    ink = pens.sum(dim=(1, 2, 3))
    assert pens.min() >= 0 and torch.allclose(pens.amax(dim=(1, 2, 3)), torch.ones(40))  # peak at 1, as the runtime
    assert ink.max() > 1.5 * ink.min()  # several pen widths
    for img in pens[:, 0]:  # framed like MNIST
        ys, xs = torch.nonzero(img > 0.3, as_tuple=True)
        assert 17 <= max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 22


def test_the_pen_is_round_and_the_distances_draw_it_exactly():
    """A pen of radius r covers the pixels within r of the skeleton: a single dot becomes a disc, and
    on real-looking strokes the precomputed distances give exactly a round pen stamped along the
    skeleton (a convolution with a disc)."""
    dot = torch.zeros(1, 56, 56, dtype=torch.uint8)
    dot[0, 28, 28] = 1
    d2 = data.squared_distances(dot)[0]
    for r in data.PEN_RADII:
        ys, xs = torch.nonzero(d2 <= r * r, as_tuple=True)
        assert ys.max() - ys.min() == xs.max() - xs.min() == 2 * int(r)  # as wide as tall: 3 to 11 px at 2x
        assert bool(d2[28 + int(r), 28 + int(r)] <= r * r) == (2 * int(r) ** 2 <= r * r)  # the square's corner is cut
    assert int(data.squared_distances(torch.zeros(1, 56, 56, dtype=torch.uint8)).min()) == 255  # no skeleton, no ink

    skel = data.skeletons(torch.from_numpy(synthetic_digits(8, seed=3)[0]))
    d2 = data.squared_distances(skel).float()
    off = torch.arange(-5, 6, dtype=torch.float32)
    dist = torch.sqrt(off.view(-1, 1) ** 2 + off.view(1, -1) ** 2)
    for r in data.PEN_RADII:
        stamped = F.conv2d(skel.float().unsqueeze(1), (dist <= r).float().view(1, 1, 11, 11), padding=5)[:, 0] > 0.5
        assert torch.equal(stamped, d2 <= r * r)


@pytest.mark.mnist
def test_fidelity_validation_digits_are_the_trainers_validation_split(mnist_dir):
    """`canvas_fidelity --split val` compares recipes on exactly the digits training held out."""
    from ferry.bench.canvas_fidelity import read_mnist_validation

    splits = data.split(*data.load_mnist_arrays(mnist_dir), val_size=TrainConfig().val_size)
    images, labels = read_mnist_validation(mnist_dir)
    assert images.shape == (5000, 28, 28)
    assert np.array_equal(images, splits.val_x.numpy()) and np.array_equal(labels, splits.val_y.numpy())
    test_images, _ = data.read_mnist(mnist_dir, "t10k")
    assert not {d.tobytes() for d in images[:500]} & {d.tobytes() for d in test_images}  # never the test digits
