"""A ferry model's self-description: the JSON under the ONNX model's metadata_props["ferry"].

`read_metadata_file` reads it straight from the file's protobuf wire format (no onnx, no session:
the graph is skipped, not parsed), so tools can describe a model without loading it.
`check_coherent` refuses a variant (int8/fp16) whose fp32 sibling is no longer the file it was
derived from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

from ferry.core.errors import FerryError

METADATA_KEY = "ferry"
REQUIRED_KEYS = ("labels", "preprocess", "model")
_METADATA_PROPS_FIELD = 14  # onnx.ModelProto.metadata_props


class IncoherentModelSet(FerryError):
    """A variant whose fp32 sibling has been replaced since the variant was made from it."""


def parse_metadata(raw: str | None, path: str | Path) -> dict[str, Any]:
    if raw is None:
        raise FerryError(f"{path} has no ferry metadata (export it with `ferry export`)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FerryError(f"{path}: its ferry metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise FerryError(f"{path}: its ferry metadata is not a JSON object")
    for key in REQUIRED_KEYS:
        if key not in meta:
            raise FerryError(f"{path}: its ferry metadata lacks {key!r}")
    return meta


def _varint(f: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            return None if shift == 0 else _truncated()
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _truncated():
    raise ValueError("truncated protobuf")


def _entry(buf: bytes) -> tuple[str, str]:
    """StringStringEntryProto: key = field 1, value = field 2."""
    import io

    f, out = io.BytesIO(buf), {1: "", 2: ""}
    while (tag := _varint(f)) is not None:
        if tag & 7 != 2:
            raise ValueError("unexpected wire type in a metadata entry")
        n = _varint(f)
        out[tag >> 3] = f.read(n).decode("utf-8")
    return out[1], out[2]


def read_metadata_props(path: str | Path) -> dict[str, str]:
    """All metadata_props of an ONNX file, without parsing its graph."""
    props: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            while (tag := _varint(f)) is not None:
                field, wire = tag >> 3, tag & 7
                if wire == 0:
                    _varint(f)
                elif wire == 1:
                    f.seek(8, 1)
                elif wire == 5:
                    f.seek(4, 1)
                elif wire == 2:
                    n = _varint(f)
                    if n is None:
                        _truncated()
                    if field == _METADATA_PROPS_FIELD:
                        buf = f.read(n)
                        if len(buf) != n:
                            _truncated()
                        key, value = _entry(buf)
                        props[key] = value
                    else:
                        f.seek(n, 1)
                else:
                    raise ValueError(f"unexpected wire type {wire}")
    except OSError as exc:
        raise FerryError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise FerryError(f"{path} is not a readable ONNX file ({exc})") from exc
    return props


def read_metadata_file(path: str | Path) -> dict[str, Any]:
    """The ferry metadata of an exported model file."""
    if not Path(path).is_file():
        raise FerryError(f"model not found: {path}")
    return parse_metadata(read_metadata_props(path).get(METADATA_KEY), path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fp32_sibling(path: str | Path, meta: dict[str, Any]) -> Path:
    """Where a variant's fp32 model lives: <model>.onnx beside <model>.<precision>.onnx."""
    return Path(path).with_name(f"{meta['model']}.onnx")


def check_coherent(path: str | Path, meta: dict[str, Any]) -> None:
    """A variant records the sha256 of the fp32 file it was derived from. If that fp32 file is beside
    it and has changed since (a newer export), the variant is stale: refuse it. A variant deployed
    on its own (no sibling) is accepted."""
    derived = meta.get("derived_from")
    if meta.get("precision", "fp32") == "fp32" or not derived:
        return
    sibling = fp32_sibling(path, meta)
    if not sibling.is_file():
        return
    if sha256_file(sibling) != derived["sha256"]:
        raise IncoherentModelSet(
            f"{path} was made from another {sibling.name} (sha256 {derived['sha256'][:12]}...) than the one beside it "
            f"now: it is stale. Re-export with `ferry export ... --{meta.get('precision')}` or remove it"
        )
