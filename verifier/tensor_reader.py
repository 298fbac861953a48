"""Read parts of a (possibly sharded, possibly huge) Hub checkpoint's tensors without loading it.

`TensorReader` maps each tensor name to the safetensors file that holds it (from
`model.safetensors.index.json` when present, else the one `model.safetensors`), and reads slices
through safetensors' `get_slice`, so only the bytes asked for are copied into memory. A caller
that reads shard by shard (`names_by_file`, then `open_file`) keeps at most one shard mapped: the
process's address space stays near one shard's size, not the checkpoint's.

Every value comes back as float32 (bf16 widens exactly: its bits are read from the file, since
NumPy has no bf16 type).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from engine.checkpoint.loader import INDEX_FILE, SINGLE_FILE, CheckpointError

Part = tuple  # per-axis slices, as get_slice takes them


class TensorReader:
    """Tensor name -> file for one checkpoint directory; reads slices lazily."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.files = self._locate()

    def _locate(self) -> dict[str, Path]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
            return {name: self.model_dir / shard for name, shard in weight_map.items()}
        single = self.model_dir / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"{self.model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} is present")
        with _opened(single) as handle:
            return {name: single for name in handle.keys()}

    def names_by_file(self, names) -> dict[Path, list[str]]:
        """`names` grouped by the file holding them, files in sorted order."""
        grouped: dict[Path, list[str]] = {}
        for name in names:
            grouped.setdefault(self.files[name], []).append(name)
        return dict(sorted(grouped.items()))

    def shape(self, name: str) -> tuple[int, ...]:
        with _opened(self.files[name]) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def read(self, name: str, part: Part = ()) -> np.ndarray:
        """One tensor's part (() for all) as float32; opens its file for this read only."""
        with open_file(self.files[name]) as shard:
            return shard.read(name, part)


class _Shard:
    """One open safetensors file."""

    def __init__(self, path: Path, handle):
        self.path, self._handle = path, handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def read(self, name: str, part: Part = ()) -> np.ndarray:
        info = self._handle.get_slice(name)
        if info.get_dtype() == "BF16":
            return _read_bf16(self.path, name, part)
        if info.get_dtype() not in ("F32", "F16", "F64"):
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {info.get_dtype()}; expected a float")
        return np.ascontiguousarray(info[part] if part else self._handle.get_tensor(name), dtype=np.float32)


@contextmanager
def open_file(path: Path) -> Iterator[_Shard]:
    """One shard open (mapped) for the duration of the block."""
    with _opened(path) as handle:
        yield _Shard(path, handle)


@contextmanager
def _opened(path: Path):
    try:
        handle = safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    with handle:
        yield handle


def _read_bf16(path: Path, name: str, part: Part) -> np.ndarray:
    """NumPy has no bfloat16 and safetensors' NumPy reader refuses it, so map the tensor's bytes from
    the file header's offsets as uint16 and widen them exactly (bf16 is float32's top 16 bits).
    Only the sliced part is copied; no Paddle import (its address space alone would exceed a tight
    memory limit)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_len))[name]
    start, _ = info["data_offsets"]
    bits = np.memmap(path, dtype="<u2", mode="r", offset=8 + header_len + start, shape=tuple(info["shape"]))
    part_bits = np.asarray(bits[part] if part else bits)
    return (part_bits.astype(np.uint32) << 16).view(np.float32)
