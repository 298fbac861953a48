"""The routing file: one request's table of routed expert ids, as safetensors bytes with metadata.

Layout: a single tensor "topk_ids" [tokens, moe_layers, top_k] of the smallest signed integer
dtype that holds the expert count, plus string metadata (safetensors allows only str -> str):

  format        "graphgate-r3/1"
  request       the request's name
  model         sha256 of the model config (engine/routing_replay/__init__.model_identity)
  moe_layers    comma-separated decoder layer ids, one per column of axis 1
  top_k, num_experts, prompt_length, num_tokens   decimal integers
  prompt        sha256 of the prompt's token ids (int64 little-endian)
  checksum      sha256 over the other metadata (sorted "key=value" lines) and the ids' bytes

The checksum covers the metadata too: a flipped bit in "prompt_length" must not load as a valid
file with another length. Nothing here unpickles: safetensors is a JSON header plus raw bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from engine.routing_replay.errors import RoutingChecksumError, RoutingFileCorrupt, RoutingMismatch

FORMAT = "graphgate-r3/1"
EXTENSION = ".safetensors"
TENSOR = "topk_ids"
_INT_FIELDS = ("top_k", "num_experts", "prompt_length", "num_tokens")
_FIELDS = frozenset({"format", "request", "model", "moe_layers", "prompt", "checksum", *_INT_FIELDS})


def ids_dtype(num_experts: int) -> np.dtype:
    """The smallest signed integer dtype holding ids 0..num_experts-1 and -1 (empty)."""
    for dtype in (np.int8, np.int16, np.int32):
        if num_experts - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def prompt_digest(prompt_ids) -> str:
    return hashlib.sha256(np.asarray(prompt_ids, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class RoutingTable:
    """One request's recorded routing and what identifies it."""

    request: str
    model: str
    moe_layers: tuple[int, ...]
    top_k: int
    num_experts: int
    prompt_length: int
    prompt: str  # prompt_digest of the prompt's ids
    ids: np.ndarray  # [num_tokens, len(moe_layers), top_k]

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    def metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "request": self.request, "model": self.model,
                "moe_layers": ",".join(map(str, self.moe_layers)), "prompt": self.prompt,
                **{name: str(int(getattr(self, name))) for name in _INT_FIELDS}}
        meta["checksum"] = _checksum(meta, self.ids)
        return meta


def _checksum(meta: dict[str, str], ids: np.ndarray) -> str:
    digest = hashlib.sha256()
    for key in sorted(k for k in meta if k != "checksum"):
        digest.update(f"{key}={meta[key]}\n".encode())
    digest.update(str(ids.dtype).encode() + repr(ids.shape).encode())
    digest.update(np.ascontiguousarray(ids).tobytes())
    return "sha256:" + digest.hexdigest()


def encode(table: RoutingTable) -> bytes:
    """The file's bytes. The table's ids must already have the shape and dtype the metadata says."""
    expected = (table.num_tokens, len(table.moe_layers), table.top_k)
    if table.ids.shape != expected or table.ids.dtype != ids_dtype(table.num_experts):
        raise ValueError(f"request {table.request!r}: ids {table.ids.shape} {table.ids.dtype} do not fit "
                         f"{expected} {ids_dtype(table.num_experts)}")
    return st_save({TENSOR: np.ascontiguousarray(table.ids)}, metadata=table.metadata())


def decode(data: bytes, path: str | Path) -> RoutingTable:
    """Parse and verify a file's bytes; every failure is a RoutingFileError naming `path`."""
    if not data:
        raise RoutingFileCorrupt(path, "empty file (zero bytes)")
    try:
        meta = _header_metadata(data)
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as err:
        raise RoutingFileCorrupt(path, f"truncated or not a safetensors file ({err})") from None
    _check_fields(meta, tensors, path)
    ids = tensors[TENSOR]
    if meta["checksum"] != _checksum(meta, ids):
        raise RoutingChecksumError(path, "checksum mismatch: the ids or metadata differ from what was written")
    table = _table(meta, ids, path)
    _check_consistent(table, path)
    return table


def _header_metadata(data: bytes) -> dict[str, str]:
    # safetensors.numpy.load drops the metadata; read it from the header ourselves.
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes: shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(f"header of {size} bytes but only {len(data) - 8} follow")
    header = json.loads(data[8:8 + size].decode("utf-8"))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata in the header")
    return meta


def _check_fields(meta: dict, tensors: dict, path) -> None:
    if set(meta) != _FIELDS or not all(isinstance(v, str) for v in meta.values()):
        raise RoutingChecksumError(path, f"metadata keys {sorted(meta)} are not {sorted(_FIELDS)}")
    if meta["format"] != FORMAT:
        raise RoutingMismatch(path, f"format {meta['format']!r}, this reader knows {FORMAT!r}")
    if set(tensors) != {TENSOR}:
        raise RoutingChecksumError(path, f"tensors {sorted(tensors)}, expected only {TENSOR!r}")


def _table(meta: dict[str, str], ids: np.ndarray, path) -> RoutingTable:
    try:
        ints = {name: int(meta[name]) for name in _INT_FIELDS}
        layers = tuple(int(x) for x in meta["moe_layers"].split(",")) if meta["moe_layers"] else ()
    except ValueError as err:
        raise RoutingChecksumError(path, f"a metadata number does not parse ({err})") from None
    if ids.ndim != 3 or ids.shape[0] != ints["num_tokens"]:
        raise RoutingMismatch(path, f"ids of shape {ids.shape}, metadata says {ints['num_tokens']} tokens")
    return RoutingTable(meta["request"], meta["model"], layers, ints["top_k"], ints["num_experts"],
                        ints["prompt_length"], meta["prompt"], ids)


def _check_consistent(table: RoutingTable, path) -> None:
    """Shape, dtype and id range agree with the metadata (a writer bug, since the checksum passed)."""
    shape = (table.num_tokens, len(table.moe_layers), table.top_k)
    if table.ids.shape != shape:
        raise RoutingMismatch(path, f"ids of shape {table.ids.shape}, expected [tokens, "
                                    f"{len(table.moe_layers)}, {table.top_k}]")
    if table.ids.dtype != ids_dtype(table.num_experts):
        raise RoutingMismatch(path, f"ids of dtype {table.ids.dtype}, expected {ids_dtype(table.num_experts)}")
    if table.num_tokens < table.prompt_length:
        raise RoutingMismatch(path, f"{table.num_tokens} rows for a {table.prompt_length}-token prompt")
    if table.ids.size and (table.ids.min() < 0 or table.ids.max() >= table.num_experts):
        raise RoutingMismatch(path, f"ids outside [0, {table.num_experts}): the table has unrecorded rows")
