"""Runtime: torch-free inference, metadata-driven preprocessing, providers, bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferry.core.errors import FerryError
from ferry.runtime.classifier import Candidate, Classifier, Prediction
from ferry.runtime.presets import EmptyImageError, imagenet_spec, normalize_digit, preprocess_imagenet
from tests.conftest import BAD_IMAGES, REPO, assert_clean_error, run_ferry, synthetic_digits

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)())


# --- preprocessing --------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "IMAGENET1K_V2"])
@pytest.mark.parametrize("name", PHOTOS)
def test_imagenet_preprocessing_equals_torchvision(weights, name):
    import torchvision.models as tvm

    transforms = tvm.ResNet50_Weights[weights].transforms()
    spec = imagenet_spec(resize=transforms.resize_size[0], crop=transforms.crop_size[0])
    img = photo(name).convert("RGB")
    ours = preprocess_imagenet(img, spec)
    ref = transforms(img).numpy()
    assert ours.shape == ref.shape == (3, 224, 224)
    assert np.array_equal(ours, ref)  # bit for bit


def test_every_pixel_value_is_normalized_as_torchvision_does_bit_for_bit():
    """Each 8-bit value of each channel becomes exactly what torchvision's preset makes of it (x / 255,
    then (x - mean) / std, in float32), through the ImageNet and the letterbox paths: an image holding
    all 256 values in every channel, at its own size so nothing is resized. A reciprocal multiply, a
    float64 pass or another order changes some values' last bits."""
    import torchvision.models as tvm

    from ferry.runtime.presets import letterbox_spec, preprocess_letterbox

    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([values, np.roll(values, 85), values[::-1]], axis=-1)  # each channel in another order
    img = Image.fromarray(rgb)
    want = tvm.ResNet50_Weights.IMAGENET1K_V1.transforms(crop_size=16, resize_size=16)(img).numpy()
    got = preprocess_imagenet(img, imagenet_spec(resize=16, crop=16))
    assert got.dtype == np.float32 and np.array_equal(got, want)
    wide = Image.fromarray(rgb.reshape(8, 32, 3))  # not square: the letterbox's rows and columns apart
    boxed, _ = preprocess_letterbox(wide, letterbox_spec(size=(20, 40)))
    assert np.array_equal(boxed[:, :8, :32], want.reshape(3, 8, 32))  # (each value alone: any layout)
    assert not boxed[:, 8:].any() and not boxed[:, :, 32:].any()  # the padding: the mean colour, 0


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "1"])
def test_any_mode_becomes_rgb(mode):
    base = photo("chelsea")
    img = base.convert(mode) if mode not in ("I;16", "I") else Image.fromarray(
        (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16 if mode == "I;16" else np.int32))
    out = preprocess_imagenet(img, imagenet_spec())
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()
    if mode in ("I;16", "I"):  # 16-bit data is scaled, not clipped to white
        gray = preprocess_imagenet(base.convert("L"), imagenet_spec())
        assert np.abs(out - gray).max() < 0.05


def _canvas_from_digit(digit: np.ndarray, size: int, top: int, left: int, canvas: int = 280) -> Image.Image:
    """A 28x28 light-on-dark digit drawn dark-on-light, scaled to `size`, somewhere on a white canvas."""
    page = Image.new("L", (canvas, canvas), 255)
    ink = Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BILINEAR)
    page.paste(ink, (left, top))
    return page


def test_mnist_image_passes_straight_through():
    digit = synthetic_digits(1)[0][0]
    digit[:2], digit[-2:], digit[:, :2], digit[:, -2:] = 0, 0, 0, 0
    out = normalize_digit(Image.fromarray(digit))
    assert np.array_equal(out, digit.astype(np.float32) / 255)


def test_digit_normalization_undoes_size_position_and_polarity():
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a "1": tall bar, centred like MNIST
    digit[6:9, 9:13] = 255
    reference = normalize_digit(_canvas_from_digit(digit, 112, 84, 84))
    for size, top, left in ((60, 10, 10), (250, 15, 20), (100, 170, 5)):
        out = normalize_digit(_canvas_from_digit(digit, size, top, left))
        assert out.shape == (28, 28) and out.max() == pytest.approx(1.0, abs=0.05)
        ys, xs = np.nonzero(out > 0.2)
        assert ys.max() - ys.min() + 1 <= 20 and 12 <= out.sum(0).argmax() <= 16
        com = (np.indices(out.shape) * out).sum(axis=(1, 2)) / out.sum()
        assert np.allclose(com, 13.5, atol=1.0)
        assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.9


def test_blank_or_dot_is_not_a_digit():
    with pytest.raises(EmptyImageError):
        normalize_digit(Image.new("L", (280, 280), 255))
    dot = Image.new("L", (280, 280), 255)
    dot.putpixel((140, 140), 0)
    with pytest.raises(EmptyImageError):
        normalize_digit(dot)


# --- predictions match PyTorch ----------------------------------------------------------------

def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.slow
def test_resnet_predictions_equal_pytorch_on_photos(resnet_export):
    import torch
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.resnet50(weights=None).eval()  # same seed as `--weights none`
    clf = Classifier.from_onnx(resnet_export.paths["fp32"], provider="cpu")
    transforms = tvm.ResNet50_Weights.DEFAULT.transforms()  # what --weights none takes its preprocessing from
    for name in PHOTOS:
        img = photo(name).convert("RGB")
        pred = clf.predict(img, top_k=5)
        with torch.no_grad():
            probs = _softmax(model(transforms(img)[None]).numpy())[0]
        top5 = np.argsort(-probs)[:5]
        assert [c.index for c in pred.top_k] == list(top5), name
        assert np.allclose([c.probability for c in pred.top_k], probs[top5], atol=1e-4)
        assert pred.provider == "CPUExecutionProvider"


def test_cnn_predictions_equal_pytorch(cnn_export):
    import torch

    path, model = cnn_export
    clf = Classifier.from_onnx(path, provider="cpu")
    x, _ = synthetic_digits(64, seed=5)
    x[:, :2], x[:, -2:], x[:, :, :2], x[:, :, -2:] = 0, 0, 0, 0
    preds = [clf.predict(img, top_k=5) for img in x]
    with torch.no_grad():
        probs = _softmax(model((torch.from_numpy(x).float()[:, None] / 255 - 0.1307) / 0.3081).numpy())
    for pred, p in zip(preds, probs):
        top5 = np.argsort(-p)[:5]
        assert [c.index for c in pred.top_k] == list(top5)
        assert np.allclose([c.probability for c in pred.top_k], p[top5], atol=1e-4)


@pytest.mark.mnist
@pytest.mark.slow
def test_runtime_equals_pytorch_on_mnist_test_images(real_mnist_run, mnist_dir, tmp_path):
    import torch

    from ferry.export.pipeline import ExportOptions, export_model
    from ferry.train.data import load_mnist_arrays, normalize
    from ferry.train.trainer import load_model

    ckpt, _ = real_mnist_run
    path = export_model(ExportOptions(model="mnist-cnn", out=str(tmp_path), checkpoint=str(ckpt), data_dir=str(mnist_dir)),
                        log=lambda _m: None).paths["fp32"]
    clf = Classifier.from_onnx(path, provider="cpu")
    model, _ = load_model(ckpt)
    _, _, test_x, _ = load_mnist_arrays(mnist_dir)
    images = test_x[:1000]
    preds = list(clf.predict_many(list(images.numpy()), top_k=5, batch_size=250))
    with torch.no_grad():
        probs = _softmax(model(normalize(images)).numpy())
    for outcome, p in zip(preds, probs):
        top5 = np.argsort(-p)[:5]
        assert [c.index for c in outcome.prediction.top_k] == list(top5)
        assert np.allclose([c.probability for c in outcome.prediction.top_k], p[top5], atol=1e-4)


# --- torch-free ---------------------------------------------------------------------------------

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'onnx', 'onnxscript'):
            raise ImportError(name + ' is blocked in this process')
sys.meta_path.insert(0, Block())
"""


def test_runtime_runs_where_torch_cannot_be_imported(cnn_export, tmp_path):
    """Arrays, decoded PNG/JPEG files, a folder through predict_many and the `ferry predict` command,
    all in processes where torch (and onnx) cannot be imported."""
    path, _ = cnn_export
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(tmp_path / "a.png")
    Image.fromarray(255 - digit).resize((120, 120)).convert("RGB").save(tmp_path / "b.jpg")
    code = BLOCK_TORCH + f"""
import numpy as np
from ferry.runtime import Classifier
clf = Classifier.from_onnx({str(path)!r}, provider='auto')
img = np.zeros((28, 28), np.uint8); img[6:22, 12:16] = 255
p = clf.predict(img, top_k=3)
files = [clf.predict({str(tmp_path / "a.png")!r}), clf.predict({str(tmp_path / "b.jpg")!r})]
outcomes = list(clf.predict_many([{str(tmp_path / "a.png")!r}, {str(tmp_path / "b.jpg")!r}]))
assert all(o.ok for o in outcomes), outcomes
assert not any(m.split('.')[0] in ('torch', 'torchvision', 'onnx') for m in sys.modules)
print(p.index, p.provider, files[0].index, files[1].index)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    index, provider, from_png, from_jpg = proc.stdout.split()
    assert provider == "CPUExecutionProvider" and from_png == index
    cli = BLOCK_TORCH + f"""
from ferry.cli import main
code = main(['predict', {str(path)!r}, {str(tmp_path)!r}, '--top-k', '2'])
assert not any(m.split('.')[0] in ('torch', 'torchvision', 'onnx') for m in sys.modules)
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": predicted ") == 2 and "b.jpg" in proc.stdout


# --- bad input -----------------------------------------------------------------------------------

def test_bad_inputs_are_named_and_the_rest_still_run(cnn_export, bad_folder):
    path, _ = cnn_export
    clf = Classifier.from_onnx(path, provider="cpu")
    files = sorted(str(p) for p in bad_folder.iterdir())
    outcomes = {Path(o.source).name: o for o in clf.predict_many(files, batch_size=2)}
    assert outcomes["a_good.png"].ok and outcomes["b_good_big.jpg"].ok
    for name, needle in BAD_IMAGES.items():
        assert not outcomes[name].ok and needle in outcomes[name].error and name in outcomes[name].error, outcomes[name]


def test_cli_folder_run_reports_failures_and_exit_code(cnn_export, bad_folder, tmp_path):
    path, _ = cnn_export
    out = tmp_path / "r.json"
    proc = run_ferry("predict", str(path), str(bad_folder), "--json", str(out), "--provider", "cpu", "--top-k", "3")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "6 of 8 inputs failed" in proc.stderr
    assert "a_good.png: predicted" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["provider"] == "CPUExecutionProvider" and doc["failed"] == 6
    ok = [r for r in doc["results"] if r["ok"]]
    assert len(ok) == 2 and len(ok[0]["top_k"]) == 3 and ok[0]["label"] in set("0123456789")


def test_every_entry_of_a_folder_is_a_row_and_a_folder_it_cannot_read_is_an_error(cnn_export, tmp_path, monkeypatch):
    """Nothing is left out silently: a link to nowhere, a FIFO, a link to a folder and a folder that
    cannot be listed, inside a folder, are rows with their reason (the FIFO not opened, which would
    wait for a writer), a file that cannot be reached says "permission denied", the folder given
    unreadable is one error, and an empty input path (an unset variable) is refused rather than
    read as the current folder."""
    import ferry.runtime.images as images
    from ferry.runtime.inputs import expand_inputs

    folder = tmp_path / "mixed"
    folder.mkdir()
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(folder / "a.png")
    (folder / "b_gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(folder / "c_pipe")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.png").write_bytes(b"x")
    files = expand_inputs([str(folder)])
    assert [Path(f).name for f in files] == ["a.png", "b_gone.png", "c_pipe"]
    proc = run_ferry("predict", str(cnn_export[0]), str(folder), "--provider", "cpu")
    assert proc.returncode == 1 and "a.png: predicted" in proc.stdout, proc.stderr
    assert "b_gone.png: no such file" in proc.stderr and "c_pipe: not a regular file" in proc.stderr
    assert_clean_error(run_ferry("predict", str(cnn_export[0]), ""), "an input path is empty")
    with pytest.raises(FerryError, match="an input path is empty"):
        expand_inputs([str(folder), ""])

    real_stat, real_scandir = os.stat, os.scandir

    def stat_denied(path, *a, **kw):  # as in a folder that cannot be entered (root is never denied)
        if str(path).endswith("a.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(images.os, "stat", stat_denied)
    with pytest.raises(FerryError, match="a.png: permission denied"):
        images.load_image(folder / "a.png")
    monkeypatch.setattr(images.os, "stat", real_stat)

    def scandir_denied(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    (folder / "locked").mkdir()
    (folder / "d_link").symlink_to(folder / "locked", target_is_directory=True)
    monkeypatch.setattr(os, "scandir", scandir_denied)
    assert [Path(f).name for f in expand_inputs([str(folder)])] == ["a.png", "b_gone.png", "c_pipe", "d_link", "locked"]
    with pytest.raises(FerryError, match="cannot read the folder .*locked: Permission denied"):
        expand_inputs([str(folder / "locked")])
    with pytest.raises(FerryError, match="d_link: is a folder"):
        images.load_image(folder / "d_link")
    assert expand_inputs([" "]) == [" "]  # a name of spaces is a name (only an empty one is refused)


def test_cli_json_never_lands_on_the_model_an_input_or_a_folder(cnn_export, bad_folder, tmp_path):
    import shutil

    model = tmp_path / "m.onnx"
    shutil.copy(cnn_export[0], model)
    image = tmp_path / "in" / "d.png"
    image.parent.mkdir()
    shutil.copy(bad_folder / "a_good.png", image)
    before = {p: p.read_bytes() for p in (model, image)}
    for target, needle in ((model, "is the model"), (image, "is an input"), (tmp_path / "in", "is a folder"),
                           (image / "r.json", "is not a folder")):
        proc = run_ferry("predict", str(model), str(image.parent), "--json", str(target), "--provider", "cpu")
        assert_clean_error(proc, "--json", needle)
        assert "predicted" not in proc.stdout  # refused before the work, not after it
    assert {p: p.read_bytes() for p in before} == before
    ok = run_ferry("predict", str(model), str(image.parent), "--json", str(tmp_path / "new" / "r.json"), "--provider", "cpu")
    assert ok.returncode == 0 and json.loads((tmp_path / "new" / "r.json").read_text())["failed"] == 0


def test_a_write_whose_rename_fails_is_one_error_and_leaves_nothing(tmp_path):
    from ferry.core.fileio import write_json_atomic

    (tmp_path / "taken").mkdir()
    with pytest.raises(FerryError, match="cannot write .*taken"):
        write_json_atomic(tmp_path / "taken", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary file left beside it


def test_a_write_to_a_link_a_fifo_or_a_device_writes_into_it(tmp_path):
    """An atomic write replaces a regular file by a rename; it must not replace what is not one: a
    symbolic link is followed (the file it names replaced, the link kept), a FIFO and a device
    (/dev/stdout, /dev/null) get the bytes written into them, and a device that takes none
    (/dev/full) is one error."""
    import threading

    from ferry.core.fileio import check_file_writable, write_json_atomic

    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_json_atomic(link, {"a": 1})
    assert link.is_symlink() and json.loads(real.read_text()) == {"a": 1}
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    check_file_writable(fifo, "--json")
    write_json_atomic(fifo, {"b": 2})
    reader.join(timeout=30)
    assert fifo.exists() and not fifo.is_file() and json.loads(got[0]) == {"b": 2}
    out = tmp_path / "stdout"  # as /dev/stdout is: a link to the process's descriptor (here, not the system's)
    out.symlink_to("/proc/self/fd/1")
    proc = subprocess.run([sys.executable, "-c", "import sys; from ferry.core.fileio import write_json_atomic; "
                           "write_json_atomic(sys.argv[1], {'e': 5})", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"e": 5} and out.is_symlink()
    # the descriptor redirected to a file (`> file`): what was printed before stays, the JSON after it, nothing lost
    code = ("import sys; from ferry.core.fileio import write_json_atomic; print('before'); "
            "write_json_atomic(sys.argv[1], {'f': 6}); print('after')")
    with open(tmp_path / "redirected.txt", "w") as fh:
        proc = subprocess.run([sys.executable, "-c", code, str(out)], stdout=fh, stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "redirected.txt").read_text().splitlines()
    assert lines[0] == "before" and lines[-1] == "after" and json.loads("\n".join(lines[1:-1])) == {"f": 6}
    (tmp_path / "redirected.txt").unlink()
    devices = []
    for name, minor in (("null", 3), ("full", 7)):  # a device of its own (root): what /dev/null and /dev/full are
        try:
            os.mknod(tmp_path / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
            devices.append(name)
        except OSError:
            break
    if devices == ["null", "full"]:
        write_json_atomic(tmp_path / "null", {"c": 3})
        with pytest.raises(FerryError, match="cannot write .*full: No space left"):
            write_json_atomic(tmp_path / "full", {"d": 4})
        assert (tmp_path / "null").is_char_device() and (tmp_path / "full").is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in devices) == ["link.json", "pipe", "real.json", "stdout"]


def test_arrays_of_the_wrong_kind_are_rejected(cnn_export):
    path, _ = cnn_export
    clf = Classifier.from_onnx(path, provider="cpu")
    for bad, needle in ((np.zeros((3, 28, 28, 2)), "shape"), (np.full((28, 28), np.nan), "NaN"),
                        (np.zeros((28, 28), dtype=object), "dtype"), (np.zeros((2, 2)), "8x8")):
        with pytest.raises(FerryError, match=needle):
            clf.predict(bad)
    with pytest.raises(FerryError, match="expected \\(N, 1, 28, 28\\)"):
        clf.run(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(FerryError, match="float32"):
        clf.run(np.zeros((2, 1, 28, 28), np.float64))
    with pytest.raises(FerryError, match="NaN"):
        clf.run(np.full((1, 1, 28, 28), np.nan, np.float32))


def test_missing_corrupt_and_mismatched_models(cnn_export, tmp_path):
    import onnx

    path, _ = cnn_export
    with pytest.raises(FerryError, match="model not found"):
        Classifier.from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(FerryError, match="is a folder"):
        Classifier.from_onnx(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(FerryError, match="empty file"):
        Classifier.from_onnx(tmp_path / "empty.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(Path(path).read_bytes()[:500])
    with pytest.raises(FerryError, match="is not a readable ONNX file"):
        Classifier.from_onnx(corrupt, provider="cpu")
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "ferry":
            meta = json.loads(prop.value)
            meta["preprocess"] = imagenet_spec().to_dict()
            meta["input"]["shape"] = ["batch", 3, 224, 224]
            prop.value = json.dumps(meta)
    mismatched = tmp_path / "mismatch.onnx"
    onnx.save(proto, str(mismatched))
    with pytest.raises(FerryError, match="does not match its metadata"):
        Classifier.from_onnx(mismatched, provider="cpu")
    assert_clean_error(run_ferry("predict", str(corrupt), "x.png"), "is not a readable ONNX file")


def test_untrained_model_warning(resnet_export, tmp_path):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    proc = run_ferry("predict", str(resnet_export.paths["fp32"]), str(tmp_path / "grey.png"), "--provider", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stdout and "predicted" in proc.stdout


def test_one_classifier_shared_by_threads(cnn_export, bad_folder, tmp_path):
    """Several threads share one Classifier, decoding files (a decompression bomb among them) and
    predicting: every thread finishes without an exception, every answer equals the single-threaded
    one, and every bomb is refused in every thread."""
    from concurrent.futures import ThreadPoolExecutor

    path, _ = cnn_export
    clf = Classifier.from_onnx(path, provider="cpu")
    x, _ = synthetic_digits(12, seed=9)
    x[:, :2], x[:, -2:], x[:, :, :2], x[:, :, -2:] = 0, 0, 0, 0
    files = []
    for i, img in enumerate(x):
        files.append(tmp_path / f"d{i}.png")
        Image.fromarray(img).save(files[-1])
    # a second bomb: just over Pillow's limit (it only warns there; ferry refuses by size itself)
    side = int((Image.MAX_IMAGE_PIXELS + 10) ** 0.5) + 1
    Image.new("1", (side, side)).save(tmp_path / "bomb2.png")
    inputs = [str(f) for f in files] + [str(bad_folder / "h_bomb.png"), str(tmp_path / "bomb2.png")]
    expected = {o.source: (o.prediction.index if o.ok else o.error) for o in clf.predict_many(inputs)}
    assert all(isinstance(expected[str(f)], int) for f in files)
    assert all("too large" in expected[b] for b in inputs[-2:])

    def worker(k: int) -> dict[str, object]:
        order = inputs[k % len(inputs):] + inputs[:k % len(inputs)]
        return {o.source: (o.prediction.index if o.ok else o.error) for o in clf.predict_many(order, batch_size=3)}

    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(worker, k) for k in range(12)]
        results = [f.result(timeout=120) for f in futures]  # re-raises any exception of a thread
    assert len(results) == 12 and all(r == expected for r in results)


def test_predict_runs_one_sample_through_buffers_each_thread_binds_once(cnn_export):
    """On the CPU `predict` copies the sample into a buffer its thread bound to the session once and
    reads the logits from the bound output: the same logits as `session.run`, bit for bit; one
    binding per thread, kept across calls; 8 threads sharing one Classifier get the single-thread
    answers (a shared buffer would mix their inputs)."""
    from tests.conftest import run_in_threads

    clf = Classifier.from_onnx(cnn_export[0], provider="cpu")
    x, _ = synthetic_digits(64, seed=3)
    for d in x[:8]:
        sample = clf.prepare(d)
        got = clf.engine.infer_one(sample)
        np.testing.assert_array_equal(got, clf.session.run(None, {clf.input_name: sample[None]})[0])
    bound = clf.engine._local.bound
    assert clf.engine.infer_one(clf.prepare(x[0])) is bound.output and clf.engine._local.bound is bound
    expected = [clf.predict(d, top_k=3) for d in x]
    general = [clf.predictions(clf.run(clf.prepare(d)[None]), 3)[0] for d in x]
    assert [[c.index for c in p.top_k] for p in expected] == [[c.index for c in p.top_k] for p in general]
    assert [p.probability for p in expected] == pytest.approx([p.probability for p in general], abs=1e-12)
    # a sample that would broadcast (or cast) into the buffer is not copied there: onnxruntime refuses it
    for wrong in (np.zeros((1, 1, 28), np.float32), np.zeros((1, 28, 28), np.float64)):
        with pytest.raises(Exception, match="(?i)dimension|shape|type"):
            clf.engine.infer_one(wrong)
    assert clf.engine._local.bound is bound
    # an engine that cannot bind (here: told so) gives the same logits through session.run
    plain = Classifier.from_onnx(cnn_export[0], provider="cpu")
    plain.engine._one = None
    np.testing.assert_array_equal(plain.engine.infer_one(clf.prepare(x[1])), clf.engine.infer_one(clf.prepare(x[1])))
    assert not hasattr(plain.engine._local, "bound")

    got: dict[int, list] = {}
    bindings: dict[int, object] = {}

    def work(t: int) -> None:
        got[t] = [clf.predict(x[(i + 8 * t) % 64], top_k=3) for i in range(64)]
        bindings[t] = clf.engine._local.bound

    run_in_threads(work, 8)
    assert len({id(b) for b in bindings.values()} | {id(bound)}) == 9
    for t in range(8):
        want = [expected[(i + 8 * t) % 64] for i in range(64)]
        assert [[c.index for c in p.top_k] for p in got[t]] == [[c.index for c in p.top_k] for p in want]
        assert [p.probability for p in got[t]] == pytest.approx([p.probability for p in want], abs=1e-6)


def test_only_float32_models_of_fixed_sizes_are_bound(cnn_export, resnet_export):
    """`infer_one` binds buffers only where it can size them from the model: float32 in and out,
    (batch, C, H, W) -> (batch, classes), all but the batch fixed; ferry's files (int8 too) qualify."""
    from types import SimpleNamespace as NS

    from ferry.runtime.engines import _bindable

    def session(in_type="tensor(float)", out_type="tensor(float)", in_shape=("batch", 1, 28, 28), out_shape=("batch", 10)):
        return NS(get_inputs=lambda: [NS(type=in_type, shape=list(in_shape))],
                  get_outputs=lambda: [NS(type=out_type, shape=list(out_shape))])

    assert _bindable(session()) == ((1, 28, 28), 10)
    assert _bindable(session(in_type="tensor(float16)")) is None
    assert _bindable(session(out_type="tensor(float16)")) is None
    assert _bindable(session(out_shape=("batch", "classes"))) is None
    assert _bindable(session(out_shape=("batch", 4, 10))) is None
    assert _bindable(session(in_shape=("batch", 1, "h", "w"))) is None
    assert Classifier.from_onnx(cnn_export[0], provider="cpu").engine._one == ((1, 28, 28), 10)
    assert Classifier.from_onnx(resnet_export.paths["int8"], provider="cpu").engine._one == ((3, 224, 224), 1000)


def test_the_fast_paths_compute_what_the_general_ones_do(cnn_export):
    """The per-call shortcuts change no bit: an MNIST-like uint8 digit by one table lookup equals the
    float path; one prediction over a few classes in plain Python equals the numpy softmax and its
    stable top-k (ties to the lower index)."""
    from ferry.runtime.classifier import _check_array
    from ferry.runtime.presets import normalize_unit_digit, standardize_digit

    clf = Classifier.from_onnx(cnn_export[0], provider="cpu")
    x, _ = synthetic_digits(300, seed=11)
    x[:, :2], x[:, -2:], x[:, :, :2], x[:, :, -2:] = 0, 0, 0, 0  # dark borders: the passthrough case
    for img in x:
        assert np.array_equal(clf.prepare(img), standardize_digit(normalize_unit_digit(_check_array(img, "mnist")), clf.spec))
    for extra in (83, 84):  # the border's sum (the four edges, corners twice) just under and at MNIST-like's bound
        edge = np.zeros((28, 28), np.uint8)
        edge[0], edge[-1], edge[:, 0], edge[:, -1] = 63, 63, 63, 63  # 112 x 63 = 7056
        edge[0, 5] += extra  # 7139: MNIST-like; 7140 = 0.25 x 255 x 112: not
        edge[8:20, 12:16] = 255
        assert np.array_equal(clf.prepare(edge), standardize_digit(normalize_unit_digit(_check_array(edge, "mnist")), clf.spec))
    for faint, blank in ((0, True), (25, True), (26, False)):  # MNIST-like and dark: blank below 0.1 x 255, as the general path
        dark = np.zeros((28, 28), np.uint8)
        dark[10:18, 12:16] = faint
        if blank:
            for path in (clf.prepare, lambda a: standardize_digit(normalize_unit_digit(_check_array(a, "mnist")), clf.spec)):
                with pytest.raises(EmptyImageError, match="blank"):
                    path(dark)
        else:
            assert np.array_equal(clf.prepare(dark), standardize_digit(normalize_unit_digit(_check_array(dark, "mnist")), clf.spec))
    light = np.full((28, 28), 255, np.uint8)  # a light border: not MNIST-like, the general path
    light[8:20, 12:16] = 0
    assert np.array_equal(clf.prepare(light), standardize_digit(normalize_unit_digit(_check_array(light, "mnist")), clf.spec))
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(10).astype(np.float32) for _ in range(100)] + [np.zeros(10, np.float32)]  # a full tie
    for row in rows:
        for k in (1, 5):
            small = clf.predictions(row[None], k)[0]
            wide = clf.predictions(np.stack([row, row]), k)[0]  # two rows: the numpy path
            assert (small.index, small.label, [(c.index, c.label) for c in small.top_k]) == \
                   (wide.index, wide.label, [(c.index, c.label) for c in wide.top_k])
            assert [c.probability for c in small.top_k] == pytest.approx([c.probability for c in wide.top_k], abs=1e-15)
    # the objects filled through their slots are the frozen dataclasses the constructors make
    made = clf.predictions(rows[0][None], 3)[0]
    assert made == Prediction(made.index, made.label, made.probability,
                              tuple(Candidate(c.index, c.label, c.probability) for c in made.top_k), made.provider)
    assert made.to_dict()["top_k"][0] == {"index": made.index, "label": made.label, "probability": made.probability}
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.top_k[0].label = "x"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(made)) == made and copy.copy(made) == made  # (Ray's workers pickle them)


def test_a_model_output_of_nan_or_infinity_is_an_error_not_a_prediction(cnn_export):
    """An fp16 model out of its range gives NaN or +inf: no probabilities, so `predict` raises and
    `predict_many` gives that input its error while the rest of its batch is predicted."""
    from ferry.runtime.classifier import ModelOutputError

    clf = Classifier.from_onnx(cnn_export[0], provider="cpu")
    digits = [np.full((28, 28), v, np.uint8) for v in (0, 0, 0, 0)]
    for d in digits:
        d[6:22, 12:16] = 255
    real = clf.engine

    class Broken:  # the real engine, but some rows' logits are NaN, +inf or all -inf
        def __init__(self, rows):
            self.rows = rows

        def infer(self, batch):
            out = real.infer(batch).copy()
            for r, value in self.rows.items():
                if r < len(out):
                    out[r, 3 if value != -np.inf else slice(None)] = value
            return out

        def infer_one(self, sample):
            return self.infer(sample[None])

        def __getattr__(self, name):
            return getattr(real, name)

    broken = dataclasses.replace(clf, engine=Broken({0: np.nan, 2: np.inf, 3: -np.inf}))
    got = list(broken.predict_many(digits, batch_size=4, top_k=3))
    assert [o.ok for o in got] == [False, True, False, False]
    assert all("NaN or infinity" in o.error for o in got if not o.ok)
    assert got[1].prediction == clf.predict(digits[1], top_k=3)
    for top_k in (1, 3):
        with pytest.raises(ModelOutputError, match="NaN or infinity"):
            broken.predict(digits[0], top_k=top_k)  # the plain-Python softmax of a few classes
        with pytest.raises(ModelOutputError):
            broken.predictions(np.vstack([np.zeros((1, 10), np.float32), np.full((1, 10), np.nan, np.float32)]), top_k)


def test_a_batch_top_k_over_many_classes_is_the_full_stable_sort(resnet_export):
    """A batch over many classes takes its top k from a partition, not a sort of every row: the
    indices are the stable full sort's (ties to the lower index), ties at the cut, NaN and one row
    included, and each candidate carries its own class's probability."""
    from ferry.runtime.classifier import top_k_order

    rng = np.random.default_rng(5)
    z = rng.standard_normal((40, 1000))
    z[1] = 0.0  # every class tied
    z[2] = rng.integers(0, 3, 1000)  # ties everywhere, at the cut too
    z[3, [7, 9, 11]] = z[3].max() + 1  # tied at the top
    z[4, 500:] = z[4, :500]  # every value twice
    z[5, [20, 10]] = np.sort(z[5])[-5]  # a tie at the fifth place
    nan = z.copy()
    nan[6, 3] = np.nan
    for k in (1, 2, 5, 10, 999, 1000, 1001):
        for x in (z, z[:1], z[7:9], nan):
            assert np.array_equal(top_k_order(x, k), np.argsort(-x, axis=1, kind="stable")[:, :k]), k

    clf = Classifier.from_onnx(resnet_export.paths["int8"], provider="cpu")
    logits = rng.standard_normal((16, 1000)).astype(np.float32)
    logits[3, [40, 30]] = logits[3].max() + 0.5  # a tie for the top: the lower index first
    p = logits.astype(np.float64)
    p = np.exp(p - p.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    for k in (1, 5):
        want = np.argsort(-p, axis=1, kind="stable")[:, :k]
        for pred, idx, row in zip(clf.predictions(logits, k), want, p):
            assert [c.index for c in pred.top_k] == idx.tolist()
            assert [c.probability for c in pred.top_k] == row[idx].tolist()
            assert [c.label for c in pred.top_k] == [clf.labels[i] for i in idx]
            assert (pred.index, pred.label, pred.probability) == (idx[0], clf.labels[idx[0]], row[idx[0]])
    assert clf.predictions(logits, 5)[3].index == 30
