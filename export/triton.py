"""A Triton Inference Server model repository for an exported model:

  DIR/<name>/config.pbtxt     onnxruntime backend, max_batch_size, dynamic batching with preferred
                              sizes, a GPU instance group, optional TensorRT FP16 acceleration,
                              input/output names and shapes from the model
  DIR/<name>/1/model.onnx     the validated model (its ferry metadata travels inside it)

Triton does not run here; the config is checked against Triton's own model-config schema (the
protobuf `tritonclient` ships) when tritonclient is installed. Serve the repository with:

  docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/DIR:/models \\
      nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ferry.core.errors import FerryError
from ferry.core.fileio import atomic_path, write_bytes_atomic
from ferry.runtime.contract import ModelMetadata

DOCKER_RUN = ("docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v {repo}:/models "
              "nvcr.io/nvidia/tritonserver:25.01-py3 tritonserver --model-repository=/models")


def config_pbtxt(meta: ModelMetadata, *, name: str, max_batch_size: int = 64, preferred: tuple[int, ...] = (8, 16, 32),
                 queue_delay_us: int = 1000, instances: int = 1, tensorrt_fp16: bool = False) -> str:
    """config.pbtxt text for an ONNX model whose metadata is `meta` (first dimension: batch; a
    detector's three outputs)."""
    if max_batch_size < 1:
        raise FerryError(f"--triton-max-batch must be >= 1 (got {max_batch_size})")
    inp = meta.input
    in_dims = ", ".join(str(d) for d in inp.shape[1:])
    types = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
    outputs = ", ".join(f'{{ name: "{o.name}" data_type: {types[o.dtype]} dims: [ {", ".join(str(d) for d in o.shape[1:])} ] }}'
                        for o in meta.all_outputs)
    pref = ", ".join(str(p) for p in preferred if p <= max_batch_size) or str(max_batch_size)
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        f'input [ {{ name: "{inp.name}" data_type: TYPE_FP32 dims: [ {in_dims} ] }} ]',
        f"output [ {outputs} ]",
        f"dynamic_batching {{ preferred_batch_size: [ {pref} ] max_queue_delay_microseconds: {queue_delay_us} }}",
        f"instance_group [ {{ count: {instances} kind: KIND_GPU }} ]",
    ]
    if tensorrt_fp16:
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "tensorrt" '
                     'parameters { key: "precision_mode" value: "FP16" } '
                     'parameters { key: "max_workspace_size_bytes" value: "1073741824" } } ] } }')
    return "\n".join(lines) + "\n"


def validate_config(text: str):
    """Parse with Triton's ModelConfig protobuf (from tritonclient); a FerryError if it does not parse.
    Returns the parsed message, or None when tritonclient is not installed."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise FerryError(f"the Triton config does not fit Triton's model-config schema: {exc}") from exc


def write_repository(onnx_path: Path, meta: ModelMetadata, repo: str | Path, *, name: str | None = None,
                     max_batch_size: int = 64, tensorrt_fp16: bool = False) -> Path:
    """Write (or replace) DIR/<name>/ for `onnx_path`; returns the model's folder."""
    name = name or meta.model
    text = config_pbtxt(meta, name=name, max_batch_size=max_batch_size, tensorrt_fp16=tensorrt_fp16)
    validate_config(text)
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "1" / "model.onnx") as tmp:
        shutil.copyfile(onnx_path, tmp)
    write_bytes_atomic(folder / "config.pbtxt", text.encode())
    return folder
