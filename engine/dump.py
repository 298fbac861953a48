"""The `.npz` dump of a run: the data every mode-vs-mode comparison reads. No pickle, ever.

Keys for prompt index i (L is the absolute index of a MoE decoder layer):
  input_ids_p{i}              [T] int64
  logits_p{i}                 [T, V] float32 (float64 from a float64 engine), logits at every prompt position
  greedy_p{i}                 [N] int64, the greedy tokens
  greedy_logits_p{i}          [N, V] float32 (or float64), the logits each greedy token was chosen from
  topk_ids_p{i}_layer{L}      [T, k] int64, routed experts per prompt token, ascending per row
  decode_topk_ids_p{i}_layer{L} [N-1, k] int64, the same for the decode steps
  names                       [P] unicode, the prompt names
The file is written to a temporary name in the same folder and renamed, so a reader never sees a
half-written dump.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.llm import RequestOutput


def dump_arrays(outputs: list[RequestOutput], moe_layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"names": np.asarray([o.name for o in outputs], dtype=np.str_)}
    for i, out in enumerate(outputs):
        arrays[f"input_ids_p{i}"] = out.input_ids.astype(np.int64)
        arrays[f"logits_p{i}"] = _float(out.logits())
        arrays[f"greedy_p{i}"] = np.asarray(out.greedy, dtype=np.int64)
        arrays[f"greedy_logits_p{i}"] = _float(np.stack(out.greedy_logits))
        for layer in moe_layers:
            arrays[f"topk_ids_p{i}_layer{layer}"] = out.topk_ids(layer).astype(np.int64)
            arrays[f"decode_topk_ids_p{i}_layer{layer}"] = _decode_ids(out, layer)
    return arrays


def _float(values: np.ndarray) -> np.ndarray:
    """float64 logits (a float64 engine) stay float64; anything else is written as float32."""
    return values.astype(np.float64 if values.dtype == np.float64 else np.float32)


def _decode_ids(out: RequestOutput, layer: int) -> np.ndarray:
    ids = out.topk_ids(layer, decode=True)
    if ids.size == 0:  # one new token means no decode step
        return np.zeros((0, out.topk_ids(layer).shape[1]), dtype=np.int64)
    return ids.astype(np.int64)


class DumpError(UserError, ValueError):
    """A dump path the engine cannot write to; the message names the path."""


def write_dump(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write atomically: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DumpError(f"dump path {path} must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_dump(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
