"""What a pool's parent and its ranks exchange through the pool folder, and how.

Payloads and replies are dicts of numpy arrays and JSON values, stored as one .npz file each
(arrays as entries, everything else as one JSON entry): nothing is pickled. Files appear
atomically (written aside, then renamed), so a reader polling for a name sees all of it or none.

Pool folder layout, one request at a time:
  request.N.npz      request N, the same for every rank (a shutdown request carries SHUTDOWN_KEY)
  reply.N.R.npz      rank R's reply to request N (a handler's exception carries ERROR_KEY)
  ready.R            rank R finished its set-up and serves
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

ERROR_KEY = "__error__"  # a reply that holds the handler's traceback instead of results
SHUTDOWN_KEY = "__shutdown__"  # a request that makes `serve` return
_JSON_KEY = "__json__"


def request_path(pool_dir: Path, number: int) -> Path:
    return pool_dir / f"request.{number}.npz"


def reply_path(pool_dir: Path, number: int, rank: int) -> Path:
    return pool_dir / f"reply.{number}.{rank}.npz"


def ready_path(pool_dir: Path, rank: int) -> Path:
    return pool_dir / f"ready.{rank}"


def encode(payload: Mapping[str, Any], reserved_ok: bool = False) -> bytes:
    """A dict of numpy arrays and JSON values -> .npz bytes. Keys starting with "__" are the
    protocol's own (`reserved_ok` lets this module's users send them)."""
    arrays, plain = {}, {}
    for key, value in payload.items():
        if not isinstance(key, str) or (key.startswith("__") and not reserved_ok):
            raise ValueError(f"payload key {key!r}: keys are strings not starting with '__'")
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"payload key {key!r}: object arrays cannot be sent (no pickle)")
            arrays[key] = value
        else:
            plain[key] = value
    try:
        text = json.dumps(plain)
    except TypeError as exc:
        raise TypeError(f"payload values must be numpy arrays or JSON values: {exc}") from None
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{_JSON_KEY: np.frombuffer(text.encode(), dtype=np.uint8)})
    return buffer.getvalue()


def decode(data: bytes) -> dict[str, Any]:
    """The inverse of `encode`; refuses pickled entries."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        payload = json.loads(npz[_JSON_KEY].tobytes())
        payload.update({key: npz[key] for key in npz.files if key != _JSON_KEY})
    return payload


def write_atomic(path: Path, data: bytes) -> None:
    """Readers on this machine see the old state or all of `data` (no fsync: not for durability)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def backoff(limit_s: float = 0.01) -> Iterator[float]:
    """Sleep lengths for a polling loop: 0.5 ms doubling up to `limit_s`, forever. Short first
    pauses answer a fast rank quickly; the limit keeps an idle wait from spinning."""
    pause = 0.0005
    while True:
        yield pause
        pause = min(2 * pause, limit_s)


def wait_for(path: Path, limit_s: float = 0.02) -> bytes:
    """The contents of `path` once it exists (it is written atomically); waits without end."""
    for pause in backoff(limit_s):
        if path.exists():
            return path.read_bytes()
        time.sleep(pause)
    raise AssertionError("unreachable: backoff() never ends")
