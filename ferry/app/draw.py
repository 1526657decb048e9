"""Draw a digit with the mouse and see the model's prediction (Tk; onnxruntime, no torch).

  ferry draw [--model models/mnist-cnn.onnx] [--provider auto|cpu|cuda|tensorrt]
  ferry draw --detector models/digits.onnx       # write a whole number: each digit boxed, the number read
  ferry draw --detector models/digits.onnx --model none   # ... its digits named by the detector alone

Drag on the canvas to draw; the prediction updates when a stroke ends (or press Predict).
Clear starts again; the slider (or [ and ]) sets the pen's width. The model reads the strokes
redrawn with an MNIST-like pen and then the runtime's MNIST-style normalization (crop to the ink,
fit 20x20, centre by mass in 28x28), so pen width, size and position do not matter. With --detector
the canvas is wide: write several digits in a row; a digit detector finds each one and boxes it, the
digit model (--model, when its file is there; `--model none`: the detector) names each from its own
strokes, and the number is read left to right."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ferry.core.errors import FerryError

DEFAULT_MODEL = "models/mnist-cnn.onnx"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ferry.runtime.engines import CHOICES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default=None,
                        help=f"the exported digit model (default: {DEFAULT_MODEL}, written by `make demo`); with --detector "
                             "it names the digits the detector finds (`none`: the detector names them)")
    parser.add_argument("--provider", choices=CHOICES, default="auto", help="execution provider (default: auto)")
    parser.add_argument("--pen-width", type=int, default=None,
                        help="pen width in pixels to start with, 6-36 (default: 18; the slider and [ ] change it)")
    parser.add_argument("--detector", metavar="MODEL",
                        help="a digit detector (ferry export of a `ferry train --task detect` model): write a whole "
                             "number and read it")


class DrawApp:
    """The window: canvas on the left, prediction and probability bars on the right."""

    BAR_W = 180

    def __init__(self, root, clf, pen_width: int | None = None) -> None:
        import tkinter as tk

        from ferry.app.canvas import CANVAS_SIZE, PEN_RANGE, PEN_WIDTH, Stroke

        self.tk, self.root, self.clf = tk, root, clf
        self.Stroke = Stroke
        self.pen_var = tk.IntVar(value=pen_width or PEN_WIDTH)
        self.pen_range = PEN_RANGE
        self.strokes: list = []
        root.title("ferry draw")
        root.resizable(False, False)

        left = tk.Frame(root, padx=10, pady=10)
        left.grid(row=0, column=0, sticky="n")
        self.canvas = tk.Canvas(left, width=CANVAS_SIZE, height=CANVAS_SIZE, bg="white", cursor="pencil",
                                highlightthickness=2, highlightbackground="#888")
        self.canvas.pack()
        buttons = tk.Frame(left, pady=8)
        buttons.pack(fill="x")
        self.predict_button = tk.Button(buttons, text="Predict", width=10, command=self.predict)
        self.predict_button.pack(side="left")
        self.clear_button = tk.Button(buttons, text="Clear", width=10, command=self.clear)
        self.clear_button.pack(side="right")
        tk.Scale(left, label="pen width  ([ and ] change it)", from_=PEN_RANGE[0], to=PEN_RANGE[1], orient="horizontal",
                 variable=self.pen_var, length=CANVAS_SIZE).pack(fill="x")

        right = tk.Frame(root, padx=10, pady=10)
        right.grid(row=0, column=1, sticky="n")
        self.digit_var = tk.StringVar(value="?")
        self.status_var = tk.StringVar(value="draw a digit")
        tk.Label(right, textvariable=self.digit_var, font=("Helvetica", 72, "bold"), width=2).pack()
        tk.Label(right, textvariable=self.status_var, font=("Helvetica", 11)).pack(pady=(0, 6))
        self.bars = tk.Canvas(right, width=self.BAR_W + 80, height=10 * 22, highlightthickness=0)
        self.bars.pack()
        self.info_var = tk.StringVar(value=f"provider: {clf.provider.used}")
        tk.Label(right, textvariable=self.info_var, font=("Helvetica", 9), fg="#555", justify="left",
                 wraplength=self.BAR_W + 80).pack(pady=(8, 6), anchor="w")
        self._draw_bars([0.0] * 10)

        self.canvas.bind("<ButtonPress-1>", self._start)
        self.canvas.bind("<B1-Motion>", self._move)
        self.canvas.bind("<ButtonRelease-1>", self._end)
        root.bind("<Return>", lambda _e: self.predict())
        root.bind("<Escape>", lambda _e: self.clear())
        root.bind("<bracketleft>", lambda _e: self.set_pen(self.pen - 4))
        root.bind("<bracketright>", lambda _e: self.set_pen(self.pen + 4))

    @property
    def pen(self) -> int:
        return int(self.pen_var.get())

    def set_pen(self, width: int) -> None:
        self.pen_var.set(max(self.pen_range[0], min(self.pen_range[1], width)))
        print(f"pen: {self.pen}", flush=True)

    # --- strokes ------------------------------------------------------------------------------

    def _start(self, event) -> None:
        self.strokes.append(self.Stroke(points=[(event.x, event.y)], width=self.pen))
        r = self.pen / 2
        self.canvas.create_oval(event.x - r, event.y - r, event.x + r, event.y + r, fill="black", outline="black")

    def _move(self, event) -> None:
        if not self.strokes:
            return self._start(event)
        x0, y0 = self.strokes[-1].points[-1]
        self.strokes[-1].points.append((event.x, event.y))
        self.canvas.create_line(x0, y0, event.x, event.y, width=self.pen, fill="black",
                                capstyle=self.tk.ROUND, joinstyle=self.tk.ROUND)

    def _end(self, _event) -> None:
        self.predict()

    # --- prediction ---------------------------------------------------------------------------

    def predict(self) -> None:
        from ferry.app.canvas import predict_strokes
        from ferry.runtime.presets import EmptyImageError

        t0 = time.perf_counter()
        try:
            pred = predict_strokes(self.clf, self.strokes)
        except EmptyImageError:
            self._show("?", "draw a digit", [0.0] * 10, None)
            return
        except FerryError as exc:
            self._show("!", str(exc), [0.0] * 10, None)
            return
        probs = [0.0] * 10
        for c in pred.top_k:
            probs[c.index] = c.probability
        self._show(pred.label, f"{pred.probability:.1%} sure", probs, 1e3 * (time.perf_counter() - t0))

    def _show(self, digit: str, status: str, probs: list[float], latency_ms: float | None) -> None:
        self.digit_var.set(digit)
        self.status_var.set(status)
        self._draw_bars(probs)
        lat = f"{latency_ms:.1f} ms" if latency_ms is not None else "-"
        self.info_var.set(f"provider: {self.clf.provider.used}\nlast prediction: {lat}")
        # one line per displayed prediction, read back from the widgets (a log, and what tests read)
        print(f"displayed: {self.digit_var.get()} | {self.status_var.get()} | provider {self.clf.provider.used} | {lat}", flush=True)

    def _draw_bars(self, probs: list[float]) -> None:
        self.bars.delete("all")
        best = max(range(10), key=lambda i: probs[i]) if any(probs) else -1
        for i, p in enumerate(probs):
            y = i * 22 + 3
            self.bars.create_text(10, y + 8, text=str(i), font=("Helvetica", 11, "bold"))
            self.bars.create_rectangle(24, y, 24 + self.BAR_W, y + 16, outline="#ccc", fill="#f2f2f2")
            if p > 0:
                self.bars.create_rectangle(24, y, 24 + max(1, self.BAR_W * p), y + 16, outline="",
                                           fill="#2b7bd6" if i == best else "#9bbfe8")
            self.bars.create_text(24 + self.BAR_W + 6, y + 8, text=f"{p:.1%}", anchor="w", font=("Helvetica", 9))

    def clear(self) -> None:
        self.strokes.clear()
        self.canvas.delete("all")
        self._show("?", "draw a digit", [0.0] * 10, None)


class NumberApp:
    """The number window: a wide canvas; after each stroke the detector boxes every digit, and the
    number is shown, read left to right."""

    def __init__(self, root, det, pen_width: int | None = None, digits=None) -> None:
        import tkinter as tk

        from ferry.app.canvas import NUMBER_CANVAS, PEN_RANGE, PEN_WIDTH, Stroke

        self.tk, self.root, self.det, self.digits = tk, root, det, digits
        self.Stroke = Stroke
        self.pen_var = tk.IntVar(value=pen_width or PEN_WIDTH)
        self.pen_range = PEN_RANGE
        self.strokes: list = []
        root.title("ferry draw: numbers")
        root.resizable(False, False)
        w, h = NUMBER_CANVAS
        frame = tk.Frame(root, padx=10, pady=10)
        frame.pack()
        self.canvas = tk.Canvas(frame, width=w, height=h, bg="white", cursor="pencil", highlightthickness=2,
                                highlightbackground="#888")
        self.canvas.pack()
        row = tk.Frame(frame, pady=8)
        row.pack(fill="x")
        tk.Button(row, text="Read", width=10, command=self.read).pack(side="left")
        tk.Button(row, text="Clear", width=10, command=self.clear).pack(side="left", padx=8)
        tk.Scale(row, label="pen width  ([ and ])", from_=PEN_RANGE[0], to=PEN_RANGE[1], orient="horizontal",
                 variable=self.pen_var, length=200).pack(side="right")
        self.number_var = tk.StringVar(value="?")
        self.status_var = tk.StringVar(value="write a number")
        tk.Label(frame, textvariable=self.number_var, font=("Helvetica", 48, "bold")).pack()
        tk.Label(frame, textvariable=self.status_var, font=("Helvetica", 10), fg="#555").pack()
        self.canvas.bind("<ButtonPress-1>", self._start)
        self.canvas.bind("<B1-Motion>", self._move)
        self.canvas.bind("<ButtonRelease-1>", lambda _e: self.read())
        root.bind("<Return>", lambda _e: self.read())
        root.bind("<Escape>", lambda _e: self.clear())
        root.bind("<bracketleft>", lambda _e: self.set_pen(self.pen - 4))
        root.bind("<bracketright>", lambda _e: self.set_pen(self.pen + 4))

    @property
    def pen(self) -> int:
        return int(self.pen_var.get())

    def set_pen(self, width: int) -> None:
        self.pen_var.set(max(self.pen_range[0], min(self.pen_range[1], width)))
        print(f"pen: {self.pen}", flush=True)

    def _start(self, event) -> None:
        self.strokes.append(self.Stroke(points=[(event.x, event.y)], width=self.pen))
        r = self.pen / 2
        self.canvas.create_oval(event.x - r, event.y - r, event.x + r, event.y + r, fill="black", outline="black")

    def _move(self, event) -> None:
        if not self.strokes:
            return self._start(event)
        x0, y0 = self.strokes[-1].points[-1]
        self.strokes[-1].points.append((event.x, event.y))
        self.canvas.create_line(x0, y0, event.x, event.y, width=self.pen, fill="black", capstyle=self.tk.ROUND,
                                joinstyle=self.tk.ROUND)

    def read(self) -> None:
        from ferry.app.canvas import read_number
        from ferry.runtime.detector import PALETTE
        from ferry.runtime.presets import EmptyImageError

        t0 = time.perf_counter()
        self.canvas.delete("boxes")
        try:
            reading = read_number(self.det, self.strokes, digits=self.digits)
        except EmptyImageError:
            return self._show("?", "write a number", None)
        except FerryError as exc:
            return self._show("!", str(exc), None)
        for d in reading.detections:
            x1, y1, x2, y2 = d.box
            color = "#{:02x}{:02x}{:02x}".format(*PALETTE[d.index % len(PALETTE)])
            self.canvas.create_rectangle(x1, y1, x2, y2, outline=color, width=2, tags="boxes")
            self.canvas.create_text(x1 + 2, y1 - 2, text=f"{d.label} {d.score:.2f}", anchor="sw", fill=color,
                                    font=("Helvetica", 11, "bold"), tags="boxes")
        found = len(reading.detections)
        self._show(reading.text or "?", f"{found} digit(s) found" if found else "no digit found",
                   1e3 * (time.perf_counter() - t0))

    def _show(self, number: str, status: str, latency_ms: float | None) -> None:
        self.number_var.set(number)
        lat = f"{latency_ms:.1f} ms" if latency_ms is not None else "-"
        self.status_var.set(f"{status}; provider {self.det.provider.used}; {lat}")
        print(f"displayed: {number} | {status} | provider {self.det.provider.used} | {lat}", flush=True)

    def clear(self) -> None:
        self.strokes.clear()
        self.canvas.delete("all")
        self._show("?", "write a number", None)


def _window():
    try:
        import tkinter as tk

        return tk.Tk()
    except ImportError as exc:
        raise FerryError("Tkinter is not available in this Python (install python3-tk / tk-dev)") from exc
    except Exception as exc:  # noqa: BLE001 - TclError: no display
        raise FerryError(f"cannot open a window: {exc} (is $DISPLAY set?)") from exc


def run_numbers(args: argparse.Namespace) -> int:
    from ferry.runtime.detector import Detector

    model = Path(args.detector)
    if not model.exists():
        raise FerryError(f"no detector at {model}: run `make demo-detect` (it trains and exports one), or export one "
                         "with `ferry export fcos_small --checkpoint CKPT --name digits --out models`")
    det = Detector.from_onnx(model, provider=args.provider)
    if set(det.labels) - set("0123456789"):
        raise FerryError(f"{model} detects {', '.join(det.labels[:5])}...; ferry draw --detector needs a digit detector "
                         "(categories 0-9)")
    if args.pen_width is not None and not 6 <= args.pen_width <= 36:
        raise FerryError(f"--pen-width must be 6-36 (got {args.pen_width})")
    digits = _digit_namer(args.model, args.provider)
    root = _window()
    NumberApp(root, det, pen_width=args.pen_width, digits=digits)
    namer = f"digits named by {digits.name} (--model)" if digits is not None else "digits named by the detector"
    print(f"ferry draw: {det.name} (detector) on {det.provider.describe()}; {namer}", flush=True)
    root.mainloop()
    return 0


def _digit_namer(model: str | None, provider: str):
    """The number window's digit model: `model`, or the default file when it is there (None without it
    or for `none`: the detector names the digits)."""
    from ferry.runtime.classifier import Classifier

    if model is not None and model.lower() == "none":
        return None
    path = Path(model or DEFAULT_MODEL)
    if not path.exists():
        if model is None:
            return None
        raise FerryError(f"no digit model at {path}: run `make demo` (it trains and exports one), or pass --model none "
                         "to let the detector name the digits")
    clf = Classifier.from_onnx(path, provider=provider)
    if clf.spec.kind != "mnist":
        raise FerryError(f"{path} is a {clf.name} model; --model needs the digit model (mnist-cnn), or none")
    return clf


def run(args: argparse.Namespace) -> int:
    from ferry.runtime.classifier import Classifier

    if getattr(args, "detector", None):
        return run_numbers(args)
    if args.model is not None and args.model.lower() == "none":
        raise FerryError("--model none is for the number window (with --detector); the digit window needs a digit model")
    model = Path(args.model or DEFAULT_MODEL)
    if not model.exists():
        raise FerryError(f"no digit model at {model}: run `make demo` (it trains and exports one), or "
                         "`ferry export mnist-cnn --checkpoint CKPT --out models` and pass --model models/mnist-cnn.onnx")
    clf = Classifier.from_onnx(model, provider=args.provider)
    if clf.spec.kind != "mnist":
        raise FerryError(f"{model} is a {clf.name} model; ferry draw needs the digit model (mnist-cnn)")
    try:
        import tkinter as tk

        root = tk.Tk()
    except ImportError as exc:
        raise FerryError("Tkinter is not available in this Python (install python3-tk / tk-dev)") from exc
    except Exception as exc:  # noqa: BLE001 - TclError: no display
        raise FerryError(f"cannot open a window: {exc} (is $DISPLAY set?)") from exc
    if args.pen_width is not None and not 6 <= args.pen_width <= 36:
        raise FerryError(f"--pen-width must be 6-36 (got {args.pen_width})")
    DrawApp(root, clf, pen_width=args.pen_width)
    print(f"ferry draw: {clf.name} on {clf.provider.describe()}", flush=True)
    root.mainloop()
    return 0
