"""Routing files: round trip, named errors for every damaged file, crash safety, permissions, and
the writer-side faults (a non-atomic write, every rank writing).

Expected tables here are built by the test (`_table`), never read back from the code under test.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time

import numpy as np
import pytest

from engine.failpoints import Failpoints
from engine.routing_replay.errors import (
    RoutingChecksumError,
    RoutingFileCorrupt,
    RoutingFileError,
    RoutingFileMissing,
    RoutingMismatch,
    RoutingWriteError,
)
from engine.routing_replay.reader import load_routing, wait_for
from engine.routing_replay.store import RoutingStore, write_atomic
from engine.routing_replay.table_file import RoutingTable, decode, encode, ids_dtype, prompt_digest

LAYERS = (1, 2, 4)
MODEL = "m" * 64


def _table(name: str = "req", tokens: int = 12, seed: int = 0, experts: int = 16, top_k: int = 2,
           prompt_length: int = 3) -> RoutingTable:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens * len(LAYERS))])
    ids = ids.reshape(tokens, len(LAYERS), top_k).astype(ids_dtype(experts))
    return RoutingTable(name, MODEL, LAYERS, top_k, experts, prompt_length, prompt_digest(range(prompt_length)), ids)


def _same(a: RoutingTable, b: RoutingTable) -> bool:
    return (a.request, a.model, a.moe_layers, a.top_k, a.num_experts, a.prompt_length, a.prompt) == \
        (b.request, b.model, b.moe_layers, b.top_k, b.num_experts, b.prompt_length, b.prompt) and \
        a.ids.dtype == b.ids.dtype and np.array_equal(a.ids, b.ids)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_round_trip(tmp_path, background):
    store = RoutingStore(tmp_path, background=background)
    tables = [_table(f"r{i}", tokens=5 + i, seed=i) for i in range(4)]
    paths = [store.save(t) for t in tables]
    store.close()  # waits for the background writes
    assert sorted(store.written) == sorted(paths)
    for path, table in zip(paths, tables):
        assert path.name == f"{table.request}.safetensors"
        assert _same(load_routing(path, model=MODEL, moe_layers=LAYERS, top_k=2), table)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files left


def test_dtype_is_the_smallest_that_holds_the_expert_count():
    assert [ids_dtype(n) for n in (16, 128, 129, 32768, 32769)] == [np.int8, np.int8, np.int16, np.int16, np.int32]


def test_files_get_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = RoutingStore(tmp_path).save(_table())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_missing_file_is_named(tmp_path):
    with pytest.raises(RoutingFileMissing, match="nope.safetensors"):
        load_routing(tmp_path / "nope.safetensors")


def test_zero_length_file_is_named(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(RoutingFileCorrupt, match=r"empty\.safetensors.*zero bytes"):
        load_routing(path)


def test_every_truncation_is_a_named_error():
    data = encode(_table())
    for length in range(len(data)):
        with pytest.raises(RoutingFileError, match="cut.safetensors"):
            decode(data[:length], "cut.safetensors")


def test_every_single_bit_flip_is_a_named_error():
    """A file damaged anywhere (header, metadata, ids, checksum) never loads as valid."""
    data = encode(_table(tokens=4))
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(RoutingFileError):
            decode(bytes(flipped), "flip.safetensors")


def test_flipped_id_is_a_checksum_mismatch():
    data = bytearray(encode(_table()))
    data[-1] ^= 1  # the last id byte
    with pytest.raises(RoutingChecksumError, match="checksum mismatch"):
        decode(bytes(data), "x.safetensors")


def test_pickle_and_other_files_are_refused(tmp_path):
    import pickle

    path = tmp_path / "old.safetensors"
    path.write_bytes(pickle.dumps({"ids": [1, 2]}))  # what the seed wrote; never unpickled here
    with pytest.raises(RoutingFileCorrupt, match="old.safetensors"):
        load_routing(path)


@pytest.mark.parametrize("field,value", [("model", "other"), ("moe_layers", (1, 2)), ("top_k", 4)])
def test_wrong_model_is_a_mismatch(tmp_path, field, value):
    path = RoutingStore(tmp_path).save(_table())
    with pytest.raises(RoutingMismatch, match=field):
        load_routing(path, **{field: value})


def test_unrecorded_rows_cannot_be_written_as_valid(tmp_path):
    table = _table()
    table.ids[3] = -1
    path = RoutingStore(tmp_path).save(table)
    with pytest.raises(RoutingMismatch, match="unrecorded rows"):
        load_routing(path)


def test_failed_write_names_the_file_and_leaves_nothing(tmp_path):
    (tmp_path / "blocked.safetensors").mkdir()  # renaming a file over a directory fails
    with pytest.raises(RoutingWriteError, match="blocked.safetensors"):
        RoutingStore(tmp_path).save(_table("blocked"))
    assert [p.name for p in tmp_path.iterdir()] == ["blocked.safetensors"]  # the temp file is gone


def test_background_failure_is_raised_at_close(tmp_path):
    (tmp_path / "blocked.safetensors").mkdir()
    store = RoutingStore(tmp_path, background=True)
    # The failing write is queued last: a failure seen earlier would be raised by the next save.
    store.save(_table("fine"))
    store.save(_table("blocked"))
    with pytest.raises(RoutingWriteError, match="blocked.safetensors"):
        store.close()
    assert _same(load_routing(tmp_path / "fine.safetensors"), _table("fine"))


@pytest.mark.parametrize("name", ["../up", ".hidden", "", "a/b", "x" * 201])
def test_request_names_that_would_escape_or_hide_are_refused(tmp_path, name):
    with pytest.raises(RoutingWriteError, match="request name"):
        RoutingStore(tmp_path).save(_table(name))


def test_a_name_is_written_once_per_run(tmp_path):
    store = RoutingStore(tmp_path)
    store.save(_table("twice"))
    with pytest.raises(RoutingWriteError, match="already written"):
        store.save(_table("twice", seed=1))


# ------------------------------------------------------------------------- ranks


def _rank_stores(tmp_path, faults: Failpoints):
    """Two ranks of one TP job saving the same request into one folder: rank 0 alone writes."""
    return [RoutingStore(tmp_path, writes=rank == 0, faults=faults) for rank in range(2)]


def planted(faults: Failpoints, name: str) -> Failpoints:
    return Failpoints(faults.active | {name})


def check_one_writer(stores) -> list[str]:
    writes = sum(len(s.written) for s in stores)
    return [] if writes == 1 else [f"{writes} writes of one request's file across {len(stores)} ranks"]


def test_exactly_one_rank_writes(tmp_path, faults):
    stores = _rank_stores(tmp_path, faults)
    for store in stores:
        store.save(_table())
    assert check_one_writer(stores) == []


def test_planted_every_rank_writes_is_caught(tmp_path, faults):
    stores = _rank_stores(tmp_path, planted(faults, "r3.every_rank_writes"))
    for store in stores:
        store.save(_table())
    assert check_one_writer(stores) != []


# ------------------------------------------------------------------------- waiting


def test_wait_for_waits_for_a_complete_file(tmp_path):
    """A partial file at the path (as an in-place writer leaves it) is not returned; the whole one is."""
    path, data = tmp_path / "late.safetensors", encode(_table("late"))
    path.write_bytes(data[: len(data) // 2])
    done = threading.Event()

    def finish_later():
        done.wait(5)
        write_atomic(path, data)

    writer = threading.Thread(target=finish_later)
    writer.start()
    threading.Timer(0.2, done.set).start()
    try:
        assert _same(wait_for(path, timeout=30, poll=0.01), _table("late"))
    finally:
        done.set()
        writer.join()


def test_wait_for_times_out_with_the_reason(tmp_path):
    with pytest.raises(RoutingFileMissing, match=r"never\.safetensors: no such file \(after waiting"):
        wait_for(tmp_path / "never.safetensors", timeout=0.05, poll=0.01)


# ------------------------------------------------------------------------- crash safety

# Kills per check. Since the writer says ready only inside its write loop, 43-52 of 60 kills caught the
# planted in-place writer under load (4 checks at once beside other work): 30 kills leave it a chance
# of about 0.25^30 to survive, and each kill forks the gate worker (a large process) once.
TRIALS = 30


def _big_table(version: int) -> RoutingTable:
    """A 390 KB table, cheap to build, different per version: big enough that a write takes a while."""
    tokens, k = 16384, 8
    ids = (np.arange(tokens * len(LAYERS) * k) * (version + 1) % 64).astype(np.int8)
    return RoutingTable("victim", MODEL, LAYERS, k, 64, 5, prompt_digest(range(5)),
                        ids.reshape(tokens, len(LAYERS), k))


def _writer_child(directory, versions, store_faults: Failpoints, ready_w: int) -> None:
    """Forked child: write the same request's file over and over (each version a different table)
    until killed. Never returns. It says it is ready only after its first whole write: from then on
    it is inside its write loop, so a kill at any moment lands in a write (or between two) even when
    a loaded machine does not run the child for a while after the fork. (Ready before the first write
    let all 60 kills of a loaded gate run land before the writer had started, and the planted
    in-place writer survived once.)"""
    for version in itertools.count():
        store = RoutingStore(directory, faults=store_faults)  # a fresh run each time: the name is reused
        store.save(versions[version % len(versions)])
        if version == 0:
            os.write(ready_w, b"x")


def check_crash_safety(directory, faults: Failpoints, trials: int, seed: int) -> list[str]:
    """Kill a writer with SIGKILL at random moments; after each kill the final path must be absent
    or hold one of the complete tables the child writes."""
    rng, problems = random.Random(seed), []
    versions = [_big_table(v) for v in range(3)]
    path = directory / "victim.safetensors"
    for trial in range(trials):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child is killed
            try:
                _writer_child(directory, versions, faults, ready_w)
            finally:
                os._exit(1)
        os.read(ready_r, 1)
        os.close(ready_r), os.close(ready_w)
        time.sleep(rng.uniform(0, 0.01))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if path.exists():
            try:
                found = load_routing(path)
            except RoutingFileError as err:
                problems.append(f"trial {trial}: {err}")
                continue
            if not any(_same(found, v) for v in versions):
                problems.append(f"trial {trial}: loads, but holds no table the writer wrote")
    return problems


def test_sigkill_mid_write_never_leaves_a_file_that_loads_wrong(tmp_path, faults):
    assert check_crash_safety(tmp_path, faults, trials=TRIALS, seed=13) == []


def test_planted_in_place_write_is_caught_by_the_crash_check(tmp_path, faults):
    assert check_crash_safety(tmp_path, planted(faults, "r3.write_in_place"), trials=TRIALS, seed=13) != []


def test_the_model_identity_ignores_the_engines_expert_form():
    """A recording made with the dense MoE form replays under the sparse one (same model), but not
    on a model that differs in a real field."""
    from dataclasses import replace

    from engine.config import MoEForm
    from engine.hf_config import read_model_config
    from engine.routing_replay import model_identity
    from fixtures.pytest_fixtures import checkpoint_dir

    cfg = read_model_config(checkpoint_dir("glm4_moe"))
    assert model_identity(replace(cfg, moe_form=MoEForm.SPARSE)) == model_identity(cfg)
    assert model_identity(replace(cfg, top_k=cfg.top_k - 1)) != model_identity(cfg)
