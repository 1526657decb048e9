"""What both trainers' loops share: the device (auto, cpu, cuda), mixed precision, and one
optimisation step that stops on a diverged loss."""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

from ferry.core.errors import FerryError


def resolve_device(requested: str) -> torch.device:
    """auto -> cuda when available else cpu; an explicit cuda without CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise FerryError(
            "--device cuda requested but CUDA is not available "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); use --device cpu or auto"
        )
    if requested not in ("cpu", "cuda"):
        raise FerryError(f"unknown device {requested!r}; choose auto, cpu or cuda")
    return torch.device(requested)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def autocast(device: torch.device):
    """Mixed precision (bf16) where it helps: on CUDA. On the CPU float32 is faster for these models."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor, *,
         device: torch.device, label_smoothing: float, where: str) -> float:
    """One forward, backward and update; returns the batch's summed loss. A loss that is not finite
    is a FerryError naming `where` (e.g. "epoch 3 step 120")."""
    with autocast(device):
        logits = model(xb)
    loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
    if not torch.isfinite(loss):
        raise FerryError(f"training diverged at {where}: loss is {loss.item()} (try a lower --lr)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item() * yb.shape[0]
