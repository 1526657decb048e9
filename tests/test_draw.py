"""The drawing canvas: strokes -> image -> prediction without a display, fidelity on MNIST drawn
on the canvas, and the real Tk window driven under Xvfb with xdotool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ferry.app.canvas import CANVAS_SIZE, Stroke, ink_extent, predict_strokes, render_strokes
from ferry.runtime.classifier import Classifier
from ferry.runtime.presets import EmptyImageError
from tests.conftest import REPO, assert_clean_error, run_ferry

SEVEN = [Stroke([(80, 60), (200, 60)]), Stroke([(200, 60), (120, 240)])]


def test_strokes_render_as_black_ink_on_white():
    img = render_strokes(SEVEN)
    assert img.size == (CANVAS_SIZE, CANVAS_SIZE) and img.mode == "L"
    arr = np.asarray(img)
    assert arr[60, 140] == 0 and arr[10, 10] == 255  # on the top bar; a far corner
    assert arr[60, 80 - 8] == 0  # round cap beyond the end point
    assert 0.02 < (arr < 128).mean() < 0.2
    assert ink_extent(SEVEN) == pytest.approx(180 + 18)


def test_empty_canvas_or_a_dot_says_draw_a_digit(cnn_export):
    clf = Classifier.from_onnx(cnn_export[0], provider="cpu")
    for strokes in ([], [Stroke([(140, 140)])], [Stroke([(140, 140), (143, 141)])]):
        with pytest.raises(EmptyImageError, match="draw a digit"):
            predict_strokes(clf, strokes)
    pred = predict_strokes(clf, SEVEN)
    assert len(pred.top_k) == 10 and abs(sum(c.probability for c in pred.top_k) - 1) < 1e-6


def test_draw_without_a_model_says_how_to_make_one(tmp_path):
    assert_clean_error(run_ferry("draw", "--model", str(tmp_path / "none.onnx")), "make demo")


@pytest.fixture(scope="session")
def real_digit_model(real_mnist_run, tmp_path_factory, mnist_dir):
    from ferry.export.pipeline import ExportOptions, export_model

    ckpt, _ = real_mnist_run
    out = tmp_path_factory.mktemp("digit_model")
    return export_model(ExportOptions(model="mnist-cnn", out=str(out), checkpoint=str(ckpt), data_dir=str(mnist_dir)),
                        log=lambda _m: None).paths["fp32"]


@pytest.mark.mnist
def test_canvas_fidelity_on_real_mnist(real_digit_model, mnist_dir):
    """MNIST digits drawn on the canvas at random sizes/positions are classified (almost) as well as
    the originals. (The 10,000-image figure for the trained model is in the docs: "Draw".)"""
    from ferry.bench.canvas_fidelity import measure_fidelity, read_mnist_test

    images, labels = read_mnist_test(mnist_dir)
    result = measure_fidelity(Classifier.from_onnx(real_digit_model, provider="cpu"), images[:1500], labels[:1500])
    assert result["bitmap_accuracy"] >= result["direct_accuracy"] - 0.015, result
    assert result["stroke_accuracy"] >= result["direct_accuracy"] - 0.03, result
    assert min(result["stroke_accuracy_per_pen_width"].values()) >= 0.93, result


# --- the real window ----------------------------------------------------------------------------

def _free_display() -> int:
    for n in range(90, 200):
        if not Path(f"/tmp/.X{n}-lock").exists() and not Path(f"/tmp/.X11-unix/X{n}").exists():
            return n
    raise RuntimeError("no free X display number")


@pytest.fixture
def xvfb():
    if not (shutil.which("Xvfb") and shutil.which("xdotool")):
        pytest.skip("GUI test needs Xvfb and xdotool (apt-get install xvfb xdotool; .ci/run installs them)")
    try:
        import tkinter  # noqa: F401
    except ImportError:
        pytest.skip("this Python has no tkinter")
    n = _free_display()
    proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if Path(f"/tmp/.X11-unix/X{n}").exists():
            break
        time.sleep(0.05)
    yield f":{n}"
    proc.terminate()
    proc.wait(timeout=10)


def _xdo(display: str, *args: str) -> str:
    return subprocess.run(["xdotool", *args], env={**os.environ, "DISPLAY": display}, capture_output=True,
                          text=True, timeout=30, check=True).stdout


def _drag(display: str, points: list[tuple[int, int]]) -> None:
    x, y = points[0]
    _xdo(display, "mousemove", str(x), str(y), "mousedown", "1")
    for x, y in points[1:]:
        _xdo(display, "mousemove", str(x), str(y))
    _xdo(display, "mouseup", "1")


def _wait_for_lines(log: Path, n: int, timeout: float = 20.0) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("displayed:")]
        if len(lines) >= n:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"the app showed {len(lines)} predictions, expected {n}: {log.read_text()}")


def _seven(ox: int, oy: int, left: int, top: int, size: int) -> list[list[tuple[int, int]]]:
    """Two mouse drags that draw a "7" in a size x size box at (left, top) of the canvas."""
    bar = [(ox + left + size * i // 10, oy + top) for i in range(11)]
    slant = [(ox + left + size - size * i // 28, oy + top + size * i // 14) for i in range(15)]
    return [bar, slant]


@pytest.mark.gui
def test_draw_window_under_xvfb(xvfb, request, tmp_path):
    """The real window, driven with the real mouse: a 7 with the default pen, Predict, Clear; then a 7
    with a thin pen (6 px, set with the [ key) and one with a thick pen (36 px, the ] key)."""
    real = os.environ.get("FERRY_MNIST_DIR") and (Path(os.environ["FERRY_MNIST_DIR"]) / "MNIST" / "raw").is_dir()
    model = request.getfixturevalue("real_digit_model" if real else "cnn_export")
    model = model[0] if isinstance(model, tuple) else model
    log = tmp_path / "draw.log"
    env = {**os.environ, "DISPLAY": xvfb, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        app = subprocess.Popen([sys.executable, "-m", "ferry", "draw", "--model", str(model), "--provider", "cpu"],
                               cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wid = _xdo(xvfb, "search", "--sync", "--name", "ferry draw").split()[0]
        geo = dict(line.split("=") for line in _xdo(xvfb, "getwindowgeometry", "--shell", wid).split())
        ox, oy = int(geo["X"]) + 12, int(geo["Y"]) + 12  # canvas origin: 10 px padding + 2 px border
        # a "7": top bar, then the diagonal; releasing the mouse predicts
        for drag in _seven(ox, oy, 80, 60, 120):
            _drag(xvfb, drag)
        _wait_for_lines(log, 2)
        # press Predict (below the canvas, left)
        _xdo(xvfb, "mousemove", str(ox + 58), str(oy + 304), "click", "1")
        lines = _wait_for_lines(log, 3)
        shown = lines[-1].split("|")
        assert shown[0].split(":")[1].strip() in set("0123456789")
        assert "provider CPUExecutionProvider" in lines[-1] and "ms" in shown[-1]
        if real:
            assert shown[0].strip() == "displayed: 7", lines
        from PIL import ImageGrab

        shot = ImageGrab.grab(xdisplay=xvfb).crop((0, 0, int(geo["WIDTH"]), int(geo["HEIGHT"])))
        shot.save(tmp_path / "draw.png")
        assert np.asarray(shot.convert("L")).std() > 10  # a real window, not a blank screen
        if os.environ.get("FERRY_SCREENSHOT"):
            shot.save(os.environ["FERRY_SCREENSHOT"])
        # Clear: back to "draw a digit"
        _xdo(xvfb, "mousemove", str(ox + 222), str(oy + 304), "click", "1")
        assert "draw a digit" in _wait_for_lines(log, 4)[-1]

        for key, presses, pen, (left, top, size), n in (("bracketleft", 4, 6, (30, 30, 220), 6),
                                                        ("bracketright", 8, 36, (90, 80, 110), 9)):
            # no window manager under Xvfb: the keyboard goes to the window under the pointer
            _xdo(xvfb, "mousemove", str(ox + 380), str(oy + 60))
            for _ in range(presses):
                _xdo(xvfb, "key", key)
            deadline = time.time() + 10
            while f"pen: {pen}" not in log.read_text() and time.time() < deadline:
                time.sleep(0.1)
            assert f"pen: {pen}" in log.read_text(), log.read_text()
            for drag in _seven(ox, oy, left, top, size):
                _drag(xvfb, drag)
            shown = _wait_for_lines(log, n)[-1]
            ImageGrab.grab(xdisplay=xvfb).crop((0, 0, int(geo["WIDTH"]), int(geo["HEIGHT"]))).save(tmp_path / f"pen{pen}.png")
            if real:
                assert shown.startswith("displayed: 7 |"), (pen, shown)
            else:
                assert shown.split("|")[0].split(":")[1].strip() in set("0123456789")
            _xdo(xvfb, "mousemove", str(ox + 222), str(oy + 304), "click", "1")  # Clear
            _wait_for_lines(log, n + 1)
    finally:
        app.terminate()
        app.wait(timeout=10)


def test_the_model_reads_every_pen_as_mnists_pen():
    from ferry.app.canvas import STROKE_RATIO, normalize_pen, strokes_to_image

    thin = [Stroke(list(s.points), width=6) for s in SEVEN]
    thick = [Stroke(list(s.points), width=36) for s in SEVEN]
    for strokes in (thin, thick):
        norm = normalize_pen(strokes)
        assert [s.points for s in norm] == [s.points for s in strokes]
        assert [s.width for s in norm] == pytest.approx([STROKE_RATIO * 180] * len(norm))  # the 7 spans 180 px
    assert np.array_equal(np.asarray(strokes_to_image(thin)), np.asarray(strokes_to_image(thick)))
    assert not np.array_equal(np.asarray(render_strokes(thin)), np.asarray(render_strokes(thick)))
