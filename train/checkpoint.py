"""Checkpoints of both trainers: written atomically (a kill never leaves a torn file) and loaded
safely (`weights_only=True`: plain tensors and containers, no code), each a FerryError when bad."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ferry.core.errors import FerryError
from ferry.core.fileio import atomic_path


def save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({**state, "torch_version": str(torch.__version__)}, tmp)


def load(path: str | Path, *, fmt: str, kind: str, required: Sequence[str]) -> dict[str, Any]:
    """The checkpoint at `path`, which must be of format `fmt` and hold `required` keys."""
    path = Path(path)
    if not path.is_file():
        raise FerryError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise FerryError(f"checkpoint {path} is corrupt or unreadable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found != fmt and found.split("/")[0] == fmt.split("/")[0]:
        raise FerryError(f"{path} was written by another version of ferry (format {found}; this one reads {fmt}, "
                         f"whose model differs): train it again with `ferry train`")
    if found != fmt:
        raise FerryError(f"{path} is not a ferry {kind} checkpoint (format {fmt} expected)")
    missing = [k for k in required if k not in state]
    if missing:
        raise FerryError(f"checkpoint {path} is incomplete: no {missing[0]!r}")
    return state
