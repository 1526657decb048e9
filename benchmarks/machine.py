"""What machine a benchmark ran on."""

from __future__ import annotations

import os
import platform

from runtime.sysinfo import cpu_model


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {},
        "gpu": None,
    }
    for mod in ("numpy", "onnxruntime", "torch", "torchvision", "onnx"):
        try:
            info["versions"][mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent library: recorded as missing
            info["versions"][mod] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info
