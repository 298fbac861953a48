"""Reading routing files: `load_routing` returns a verified table or raises a named error;
`wait_for` waits for a complete file, not merely for the path to exist."""

from __future__ import annotations

import time
from pathlib import Path

from engine.routing_replay.errors import RoutingFileCorrupt, RoutingFileError, RoutingFileMissing, RoutingMismatch
from engine.routing_replay.table_file import RoutingTable, decode


def load_routing(path: str | Path, model: str | None = None, moe_layers: tuple[int, ...] | None = None,
                 top_k: int | None = None) -> RoutingTable:
    """The table in `path`, verified (parse, checksum, shape against metadata). With `model`,
    `moe_layers` or `top_k` given, a file recorded with other values is a RoutingMismatch.
    Raises RoutingFileMissing, RoutingFileCorrupt, RoutingChecksumError or RoutingMismatch, each
    naming the file; never EOFError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RoutingFileMissing(path, "no such file") from None
    except IsADirectoryError:
        raise RoutingFileCorrupt(path, "is a directory") from None
    table = decode(data, path)
    _expect(path, "model", table.model, model)
    _expect(path, "moe_layers", table.moe_layers, moe_layers)
    _expect(path, "top_k", table.top_k, top_k)
    return table


def _expect(path: Path, field: str, found, wanted) -> None:
    if wanted is not None and found != wanted:
        raise RoutingMismatch(path, f"{field} is {found!r}, expected {wanted!r}")


def wait_for(path: str | Path, timeout: float, poll: float = 0.05, **expect) -> RoutingTable:
    """Poll until `path` holds a complete, verified file, then return its table. A file that is
    present but does not verify is waited on too (a writer of this project never exposes one, but
    another writer might); after `timeout` seconds the last reason is raised."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return load_routing(path, **expect)
        except RoutingMismatch:
            raise  # complete, but the wrong file: waiting will not fix it
        except RoutingFileError as err:
            if time.monotonic() >= deadline:
                raise type(err)(err.path, f"{err.reason} (after waiting {timeout:g} s)") from None
        time.sleep(poll)
