"""What machine a figure came from: CPU model, the instruction-set flags that change inference and
training speed (and int8 arithmetic), the CPU class they add up to, usable cores and library
versions. Reads /proc/cpuinfo and package metadata only: it imports no heavy library."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

# x86 flags that select different kernels in oneDNN (PyTorch) and MLAS (onnxruntime).
INFERENCE_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                   "amx_tile", "amx_int8", "amx_bf16")
# aarch64 features with the same role (dot products, int8 matrix multiply, bf16, SVE)
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")
VERSIONED = ("numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "openvino", "onnx", "torch", "torchvision")


def cpuinfo_text() -> str:
    """/proc/cpuinfo's text ("" where there is none): read once by a caller that asks several things of it."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    for line in (cpuinfo_text() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_id(cpuinfo: str | None = None) -> str:
    """'vendor family F model M' from /proc/cpuinfo: names the generation where the model name does not."""
    fields: dict[str, str] = {}
    for line in (cpuinfo_text() if cpuinfo is None else cpuinfo).splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "cpu family" not in fields:
        return platform.machine()
    return f"{fields.get('vendor_id', '?')} family {fields['cpu family']} model {fields.get('model', '?')}"


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The flags of INFERENCE_FLAGS (x86) or ARM_FLAGS (aarch64) this CPU has, in that order."""
    for line in (cpuinfo_text() if cpuinfo is None else cpuinfo).splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in (*INFERENCE_FLAGS, *ARM_FLAGS) if f in have]
    return []


def cpu_class(flags: list[str] | None = None) -> str:
    """A short name for the instruction-set class that decides which int8/fp32 kernels run:
    'amx', 'avx512_vnni', 'avx512 (no VNNI)', 'avx2+avx_vnni', 'avx2 (no VNNI)', or the machine."""
    f = set(cpu_flags() if flags is None else flags)
    if {"amx_tile", "amx_int8"} <= f:
        return "amx"
    if "avx512_vnni" in f:
        return "avx512_vnni"
    if "avx512f" in f:
        return "avx512 (no VNNI)"
    if "avx2" in f:
        return "avx2+avx_vnni" if "avx_vnni" in f else "avx2 (no VNNI)"
    if "asimd" in f:
        return "arm64" + (" dotprod" if "asimddp" in f else "") + (" i8mm" if "i8mm" in f else "")
    return platform.machine() or "unknown"


def usable_cpus() -> int:
    """Cores this process may run on (the affinity mask; a container's quota is not visible here)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores among the CPUs this process may use (SMT siblings counted once)."""
    allowed = None
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        pass
    cores, cpu = set(), None
    fields: dict[str, str] = {}
    for line in ((cpuinfo_text() if cpuinfo is None else cpuinfo) + "\n\n").splitlines():
        if line.strip():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
            continue
        if "processor" in fields:
            cpu = int(fields["processor"])
            if allowed is None or cpu in allowed:
                cores.add((fields.get("physical id", "0"), fields.get("core id", str(cpu))))
        fields = {}
    return len(cores) or usable_cpus()


def versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_info() -> dict[str, Any]:
    """The CPU part of every figure: model, class, flags and core counts."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "cpu_id": cpu_id(), "cpu_class": cpu_class(flags), "cpu_flags": flags,
            "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus()}


def machine_info() -> dict[str, Any]:
    """cpu_info() plus platform, Python and library versions (read from package metadata)."""
    return {**cpu_info(), "platform": platform.platform(), "python": platform.python_version(), "versions": versions()}
