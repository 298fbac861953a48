"""Read parts of a (possibly sharded, possibly huge) Hub checkpoint's tensors without loading it.

`TensorReader` maps each tensor name to the safetensors file that holds it (from
`model.safetensors.index.json` when present, else the one `model.safetensors`) and reads slices of
tensors with plain positioned reads: a safetensors file is an 8-byte header length, a JSON header
(dtype, shape, byte offsets per tensor) and the raw row-major bytes. Only the rows a slice needs are
read, a block of rows at a time, so neither the resident memory nor the address space of the
process grows with a shard's size (safetensors' own `safe_open` maps the whole file: a Hub shard of
5 GB then needs 5 GB of address space, which `ulimit -v` refuses).

Every value comes back as float32 (bf16 widens exactly: its bits are float32's top 16).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.checkpoint.loader import INDEX_FILE, SINGLE_FILE, CheckpointError

Part = tuple  # per-axis slices (step 1), as numpy basic indexing takes them; () for all
_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}  # BF16: raw bits, widened below
BLOCK_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a larger one is not a safetensors file  # rows read per positioned read: bounds memory for wide tensors


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
        with open_file(single) as shard:
            return {name: single for name in shard.names()}

    def names_by_file(self, names) -> dict[Path, list[str]]:
        """`names` grouped by the file holding them, files in sorted order."""
        grouped: dict[Path, list[str]] = {}
        for name in names:
            grouped.setdefault(self.files[name], []).append(name)
        return dict(sorted(grouped.items()))

    def read(self, name: str, part: Part = ()) -> np.ndarray:
        """One tensor's part (() for all) as float32; opens its file for this read only."""
        with open_file(self.files[name]) as shard:
            return shard.read(name, part)


class _Shard:
    """One open safetensors file: its parsed header and a file handle."""

    def __init__(self, path: Path, handle):
        self.path, self._file = path, handle
        self._header, self._base = _header(path, handle)

    def names(self) -> list[str]:
        return [n for n in self._header if n != "__metadata__"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def read(self, name: str, part: Part = ()) -> np.ndarray:
        info = self._info(name)
        shape, dtype = tuple(info["shape"]), np.dtype(_DTYPES[info["dtype"]])
        if not shape:
            return self._rows(name, info, dtype, shape, 0, 1).reshape(()).astype(np.float32)
        first, stop, step = (part[0] if part else slice(None)).indices(shape[0])
        if step != 1:
            raise ValueError(f"{name}: only contiguous row slices are read, got step {step}")
        rest = (slice(None),) + tuple(part[1:])
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
        per_block = max(1, BLOCK_BYTES // row_bytes)
        blocks = [self._rows(name, info, dtype, shape, r, min(stop, r + per_block))[rest]
                  for r in range(first, stop, per_block)] or [np.zeros((0,) + shape[1:], dtype)[rest]]
        return _widen(np.concatenate(blocks), info["dtype"])

    def _info(self, name: str) -> dict:
        info = self._header.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name}")
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {info.get('dtype')}; expected one of "
                                  f"{', '.join(_DTYPES)}")
        return info

    def _rows(self, name: str, info: dict, dtype: np.dtype, shape: tuple, first: int, stop: int) -> np.ndarray:
        """Rows [first, stop) of a tensor, read from the file (a copy)."""
        row_items = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        start = self._base + info["data_offsets"][0] + first * row_items * dtype.itemsize
        want = (stop - first) * row_items * dtype.itemsize
        self._file.seek(start)
        data = self._file.read(want)
        if len(data) != want:
            raise CheckpointError(f"{self.path}: tensor {name} is truncated (the file ends inside it)")
        return np.frombuffer(data, dtype=dtype).reshape((stop - first,) + shape[1:])


def _header(path: Path, handle) -> tuple[dict, int]:
    try:
        length = int.from_bytes(handle.read(8), "little")
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"a header of {length} bytes")
        header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError, MemoryError, OverflowError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return header, 8 + length


def _widen(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(array, dtype=np.float32)


@contextmanager
def open_file(path: Path) -> Iterator[_Shard]:
    """One shard open for the duration of the block (only its header is held in memory)."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    with handle:
        yield _Shard(path, handle)
