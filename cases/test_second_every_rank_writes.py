"""A second detector for `r3.every_rank_writes`, on the filesystem instead of the store's log.

cases/test_routing_replay_store.py counts the writes the stores list in `written`. Here only the
filesystem is watched: a store of a rank that does not write (every rank but 0) must leave no trace,
neither creating the routing folder nor replacing rank 0's file (a replaced file is a new inode,
as the atomic writer renames a fresh temporary file over it).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.routing_replay.store import RoutingStore
from engine.routing_replay.table_file import RoutingTable, ids_dtype, prompt_digest

pytestmark = pytest.mark.gate_area("routing replay")  # the report area (verifier/report.py)


def table() -> RoutingTable:
    ids = (np.arange(6 * 2 * 2) % 8).astype(ids_dtype(8)).reshape(6, 2, 2)
    return RoutingTable("req", "m" * 64, (0, 1), 2, 8, 3, prompt_digest(range(3)), ids)


def test_a_rank_that_does_not_write_leaves_no_trace(tmp_path, faults):
    folder = tmp_path / "routing"
    RoutingStore(folder, writes=False, faults=faults).save(table())
    assert not folder.exists(), f"rank 1's store touched the filesystem: {sorted(p.name for p in tmp_path.rglob('*'))}"
    path = RoutingStore(folder, writes=True, faults=faults).save(table())  # rank 0
    inode = path.stat().st_ino
    RoutingStore(folder, writes=False, faults=faults).save(table())
    assert path.stat().st_ino == inode, "rank 1 replaced rank 0's routing file"
    assert sorted(p.name for p in folder.iterdir()) == [path.name]
