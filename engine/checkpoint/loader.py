"""Hugging Face safetensors checkpoints -> NumPy arrays in the model's dtype (float32 or float64)
under their Hub names.

Strict by design: every tensor the architecture needs must be present with the right shape,
a floating dtype and finite values; anything unexpected is an error. Each error names the file
and the tensor. The one optional tensor is GLM's `mlp.gate.e_score_correction_bias`: a checkpoint
without it routes exactly as one whose bias is all zeros. What a checkpoint must hold is
`engine/checkpoint/hub_schema.py`'s to say.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import SafetensorError, safe_open

from engine.checkpoint.hub_schema import expected_tensors, layer_of, optional_tensors
from engine.config import ModelConfig
from engine.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match its config; the message names the file and tensor."""


Selection = Callable[[str], "tuple[slice, ...] | None"]


def load_weights(model_dir: str | Path, cfg: ModelConfig, select: Selection | None = None) -> dict[str, np.ndarray]:
    """Read and check every tensor; returns Hub name -> array in `cfg.dtype` (every stored dtype widens
    exactly to float64; F64 narrows to float32 in a float32 engine). `select(name)` says how much of
    a tensor this rank reads (slices per axis, () for all, None for none), so a tensor-parallel rank
    reads only its share; names and full shapes are checked either way."""
    files = checkpoint_files(Path(model_dir))
    expected = expected_tensors(cfg)
    handles = {path: _open(path) for path in files}
    found = {name: path for name, path in _tensor_locations(handles).items() if not _is_mtp(name, cfg)}
    _check_names(found, expected, optional_tensors(cfg), Path(model_dir))
    select = select or (lambda name: ())
    wanted = {name: (path, select(name)) for name, path in found.items()}
    return {name: _read_tensor(handles[path], path, name, expected[name], part, cfg.dtype)
            for name, (path, part) in wanted.items() if part is not None}


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one `model.safetensors`, or the shards an index lists."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        return _shards_from_index(index)
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} is present")
    return [single]


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
    shards = sorted({index.parent / shard for shard in weight_map.values()})
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index}: lists shard {shard.name}, which is missing")
    return shards


def _tensor_locations(handles: dict) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path, handle in handles.items():
        for name in handle.keys():
            if name in found:
                raise CheckpointError(f"{path}: tensor {name} is also stored in {found[name]}")
            found[name] = path
    return found


def _is_mtp(name: str, cfg: ModelConfig) -> bool:
    """GLM checkpoints store their multi-token-prediction layers after the decoder; skip them."""
    layer = layer_of(name)
    return layer is not None and cfg.num_layers <= layer < cfg.num_layers + cfg.num_mtp_layers


def _check_names(found: dict[str, Path], expected: dict, optional: set[str], where: Path) -> None:
    missing = sorted(set(expected) - set(found) - optional)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing{more}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{found[unexpected[0]]}: unexpected tensor {unexpected[0]}{more} "
                              f"for this config")


def _read_tensor(handle, path: Path, name: str, shape: tuple[int, ...], part: tuple[slice, ...],
                 into: str = "float32") -> np.ndarray:
    info = handle.get_slice(name)
    dtype, got = info.get_dtype(), tuple(info.get_shape())
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; expected one of {FLOAT_DTYPES}")
    if got != shape:
        raise CheckpointError(f"{path}: tensor {name} has shape {list(got)}; the config implies {list(shape)}")
    array = _as_compute_dtype(handle, path, name, dtype, part, into)
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        raise CheckpointError(f"{path}: tensor {name} has a non-finite value at index {tuple(bad.tolist())}")
    return array


def _as_compute_dtype(handle, path: Path, name: str, dtype: str, part: tuple[slice, ...], into: str) -> np.ndarray:
    if dtype in ("F32", "F16", "F64"):
        return np.ascontiguousarray(_read_part(handle, name, part), dtype=into)
    # NumPy has no bfloat16; Paddle reads it and widens it exactly (to float32, then exactly to float64).
    with safe_open(str(path), framework="paddle") as wide:
        return np.ascontiguousarray(_read_part(wide, name, part).astype("float32").numpy(), dtype=into)


def _read_part(handle, name: str, part: tuple[slice, ...]):
    return handle.get_slice(name)[part] if part else handle.get_tensor(name)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
