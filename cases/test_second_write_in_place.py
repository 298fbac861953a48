"""A second detector for `r3.write_in_place`, without killing a process.

cases/test_routing_replay_store.py kills a writer at random moments and loads what is left. This
case is the reader's side, deterministic: a reader that opens the final path at any moment the
writer has made durable (each `fsync` the writer calls) must find no file or a whole one, never a
prefix. The test looks at the final path from inside every `fsync` of a save, over a table several
write chunks long and over an existing file of the same name (a run that reuses a request name).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from engine.routing_replay.errors import RoutingFileError
from engine.routing_replay.reader import load_routing
from engine.routing_replay.store import RoutingStore
from engine.routing_replay.table_file import RoutingTable, ids_dtype, prompt_digest

pytestmark = pytest.mark.gate_area("routing replay")  # the report area (verifier/report.py)

LAYERS = (1, 2)


def table(version: int) -> RoutingTable:
    """About 256 KB of ids, different per version: several of the writer's 64 KiB chunks."""
    tokens, k, experts = 16384, 8, 64
    ids = (np.arange(tokens * len(LAYERS) * k) * (version + 3) % experts).astype(ids_dtype(experts))
    return RoutingTable("victim", "m" * 64, LAYERS, k, experts, 4, prompt_digest(range(4)),
                        ids.reshape(tokens, len(LAYERS), k))


def test_a_reader_never_sees_a_partial_routing_file(tmp_path, faults, monkeypatch):
    path = RoutingStore(tmp_path, faults=faults).save(table(0))  # the name's earlier version
    seen: list[str] = []
    real_fsync = os.fsync

    def fsync_then_read(fd):
        real_fsync(fd)
        if not path.exists():
            seen.append("absent")
            return
        try:
            loaded = load_routing(path)
        except RoutingFileError as err:
            seen.append(f"unreadable: {type(err).__name__}")
            return
        versions = [v for v in (0, 1) if np.array_equal(loaded.ids, table(v).ids)]
        seen.append(f"version {versions[0]}" if versions else "a table that was never written")

    monkeypatch.setattr(os, "fsync", fsync_then_read)
    RoutingStore(tmp_path, faults=faults).save(table(1))
    monkeypatch.undo()
    assert seen, "the writer made nothing durable"
    assert all(s in ("absent", "version 0", "version 1") for s in seen), f"a reader saw: {seen}"
    assert np.array_equal(load_routing(path).ids, table(1).ids)
