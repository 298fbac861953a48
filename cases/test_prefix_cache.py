"""The prefix cache (engine/prefix_cache.py) against a brute-force oracle, on drawn workloads.

The oracle keys cached blocks by the whole token prefix they end (no hashing), keeps reference
counts and release times, and evicts the idle block released longest ago: the rules the cache
promises, restated without its data structures. The harness plays a tiny engine: each block it
fills is tagged with the prefix whose KV it holds, and with routed-expert rows that depend on that
prefix, so a hit on the wrong block (stale after eviction, or keyed without its parent) shows as a
tag that is not the prompt's prefix, and rows lost on a hit show as rows that are not the prefix's.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import numpy as np

from engine.failpoints import Failpoints
from engine.kv_cache import BlockAllocator, CacheFullError, blocks_needed
from engine.prefix_cache import PrefixCache

BS = 2  # a small block, so that drawn prompts of a few tokens cross many block boundaries
LAYERS, TOP_K = 2, 2


def rows_for(prompt, block: int) -> np.ndarray:
    """The routed expert ids [BS, LAYERS, TOP_K] the tokens of `block` got after `prompt`'s prefix."""
    out = np.empty((BS, LAYERS, TOP_K), np.int64)
    for t in range(BS):
        pos = block * BS + t
        seed = sum((i + 3) * tok for i, tok in enumerate(prompt[:pos + 1]))
        out[t] = (seed + np.arange(LAYERS * TOP_K).reshape(LAYERS, TOP_K) + pos) % 97 + 1  # never 0
    return out


class Oracle:
    """Cached blocks as {prefix tuple: [refs, release time]}; free blocks as a count."""

    def __init__(self, num_blocks: int):
        self.free = num_blocks
        self.cached: dict[tuple, list[int]] = {}
        self.clock = 0
        self.held: dict[int, list[tuple | None]] = {}  # sequence -> per block: its cached prefix, or None

    def idle(self) -> int:
        return sum(1 for refs, _ in self.cached.values() if refs == 0)

    def hit_blocks(self, prompt) -> int:
        n = 0
        while (n + 1) * BS <= len(prompt) - 1 and tuple(prompt[:(n + 1) * BS]) in self.cached:
            n += 1
        return n

    def admit(self, sid: int, prompt) -> int | None:
        """Blocks hit, or None when the pool cannot hold the prompt (the hit is then given back)."""
        hit = self.hit_blocks(prompt)
        blocks = [tuple(prompt[:(j + 1) * BS]) for j in range(hit)]
        for prefix in blocks:
            self.cached[prefix][0] += 1
        need = blocks_needed(len(prompt), BS) - hit
        if need > self.free + self.idle():
            self._release(blocks)
            return None
        self._evict(max(0, need - self.free))
        self.free -= need
        for j in range(hit, blocks_needed(len(prompt), BS)):
            prefix = tuple(prompt[:(j + 1) * BS])
            full = (j + 1) * BS <= len(prompt)
            if full and prefix not in self.cached:
                self.cached[prefix] = [1, 0]
                blocks.append(prefix)
            else:
                blocks.append(None)
        self.held[sid] = blocks
        return hit

    def _evict(self, count: int) -> None:
        idle = sorted((stamp, prefix) for prefix, (refs, stamp) in self.cached.items() if refs == 0)
        for _, prefix in idle[:count]:
            del self.cached[prefix]
        self.free += count

    def finish(self, sid: int) -> None:
        self._release(self.held.pop(sid))

    def _release(self, blocks) -> None:
        for prefix in reversed(blocks):
            if prefix is None:
                self.free += 1
                continue
            entry = self.cached[prefix]
            entry[0] -= 1
            if entry[0] == 0:
                entry[1] = self.clock
                self.clock += 1


class Harness:
    """The cache under test, driven the way the scheduler drives it, with a tagged block memory."""

    def __init__(self, num_blocks: int, faults: Failpoints, rank: int = 0):
        self.allocator = BlockAllocator(num_blocks)
        self.cache = PrefixCache(self.allocator, BS, "model-x layout-y", faults, rank)
        self.memory: dict[int, tuple] = {}  # block -> the prefix whose KV it holds
        self.tables: dict[int, list[int]] = {}

    def admit(self, sid: int, prompt):
        hit = self.cache.lookup(prompt)
        try:
            new = self.cache.allocate(blocks_needed(len(prompt), BS) - len(hit.blocks))
        except CacheFullError:
            self.cache.release(hit.blocks)
            return None
        table = list(hit.blocks) + new
        for j in range(len(hit.blocks), len(table)):
            self.memory[table[j]] = tuple(prompt[:(j + 1) * BS])
        keys = list(hit.keys)
        for j in range(len(hit.blocks), len(prompt) // BS):
            keys.append(self.cache.key(keys[-1] if keys else None, prompt[j * BS:(j + 1) * BS]))
            self.cache.register(table[j], keys[-1], rows_for(prompt, j))
        self.tables[sid] = table
        return hit

    def finish(self, sid: int) -> None:
        self.cache.release(self.tables.pop(sid))


def check_hit(hit, prompt, harness: Harness, expected_blocks: int) -> None:
    assert hit.num_tokens <= len(prompt) - 1, f"hit of {hit.num_tokens} tokens covers the last of {len(prompt)}"
    assert len(hit.blocks) == expected_blocks, f"{prompt}: {len(hit.blocks)} blocks hit, the oracle says {expected_blocks}"
    for j, block in enumerate(hit.blocks):
        assert harness.memory[block] == tuple(prompt[:(j + 1) * BS]), \
            f"{prompt}: block {j} (id {block}) holds the KV of {harness.memory[block]}"
        np.testing.assert_array_equal(hit.rows[j * BS:(j + 1) * BS], rows_for(prompt, j),
                                      err_msg=f"{prompt}: routed rows of cached block {j}")


# Prompts that often share a leading block or two, so that draws hit, evict and hit again.
prompts = st.builds(lambda head, tail: head + tail, st.sampled_from([[], [0, 0], [0, 0, 1, 1], [1, 1]]),
                    st.lists(st.integers(0, 2), max_size=5)).filter(bool)
ops = st.lists(st.one_of(st.tuples(st.just("admit"), prompts), st.tuples(st.just("finish"), st.integers(0, 7))),
               min_size=1, max_size=24)

# Hand-made workloads, one per planted fault, so that the derandomised CI run meets each for sure.
STALE = [("admit", [0, 0, 9]), ("finish", 0), ("admit", [1, 1, 1, 1, 9]), ("finish", 0), ("admit", [0, 0, 9])]
NO_PARENT = [("admit", [0, 1, 2, 2, 3]), ("finish", 0), ("admit", [2, 2, 5])]
LAST_TOKEN = [("admit", [0, 1, 2, 3]), ("finish", 0), ("admit", [0, 1, 2, 3])]
# The tail block is released first, so it is the one evicted; the head block still hits.
LRU = [("admit", [0, 0, 1, 1, 9]), ("finish", 0), ("admit", [2, 2, 9]), ("finish", 0), ("admit", [0, 0, 1, 1, 9])]


def play(workload, num_blocks: int, faults: Failpoints) -> None:
    oracle, harness, running, sid = Oracle(num_blocks), Harness(num_blocks, faults), [], 0
    for op, arg in workload:
        if op == "finish":
            if running:
                done = running.pop(arg % len(running))
                oracle.finish(done)
                harness.finish(done)
        else:
            expected, hit = oracle.admit(sid, arg), harness.admit(sid, arg)
            assert (expected is None) == (hit is None), f"{arg}: oracle admits {expected is not None}"
            if hit is not None:
                check_hit(hit, arg, harness, expected)
                running.append(sid)
            sid += 1
        assert harness.allocator.num_free == oracle.free + oracle.idle()
        assert harness.cache.num_idle == oracle.idle()


@given(workload=ops, num_blocks=st.integers(3, 8))
@example(workload=STALE, num_blocks=3)
@example(workload=NO_PARENT, num_blocks=8)
@example(workload=LAST_TOKEN, num_blocks=8)
@example(workload=LRU, num_blocks=3)
def test_cache_matches_the_oracle(workload, num_blocks, faults):
    play(workload, num_blocks, faults)


def test_eviction_happens_and_forgets(faults):
    """The hand-made eviction workload does evict (so the drawn check above reaches eviction), and
    the evicted prefix then misses."""
    harness = Harness(3, faults)
    harness.admit(0, [0, 0, 9])
    harness.finish(0)
    harness.admit(1, [1, 1, 1, 1, 9])
    harness.finish(1)
    assert harness.cache.stats.evicted_blocks == 1
    hit = harness.admit(2, [0, 0, 9])
    assert hit.blocks == (), f"an evicted prefix hit block {hit.blocks} (now holding {harness.memory[hit.blocks[0]]})"


@given(workload=ops)
@example(workload=LAST_TOKEN)
def test_every_rank_makes_the_same_hit_decision(workload, faults):
    """Rank 0's and rank 1's caches, fed the same workload, decide the same hits (the engine also
    checks this every step across real ranks; this is the cheap restatement)."""
    ranks = [Harness(8, faults, rank) for rank in (0, 1)]
    running, sid = [], 0
    for op, arg in workload:
        if op == "finish" and running:
            done = running.pop(arg % len(running))
            for h in ranks:
                h.finish(done)
        elif op == "admit":
            hits = [h.admit(sid, arg) for h in ranks]
            decided = [None if h is None else h.blocks for h in hits]
            assert decided[0] == decided[1], f"{arg}: rank 0 hit {decided[0]}, rank 1 hit {decided[1]}"
            if hits[0] is not None:
                running.append(sid)
            sid += 1


def test_a_block_is_only_shared_after_the_same_prefix(faults):
    """Keys: the same tokens after another prefix, or under another identity, are another block."""
    cache = PrefixCache(BlockAllocator(4), BS, "model-x", faults)
    first = cache.key(None, [1, 2])
    assert cache.key(first, [3, 4]) != cache.key(cache.key(None, [5, 6]), [3, 4])
    assert cache.key(None, [3, 4]) != cache.key(first, [3, 4])
    assert PrefixCache(BlockAllocator(4), BS, "model-z", faults).key(None, [1, 2]) != first


@pytest.mark.parametrize("length", [1, BS, BS + 1, 3 * BS])
def test_a_hit_leaves_the_last_prompt_token_to_compute(length, faults):
    harness = Harness(16, faults)
    prompt = list(range(length))
    harness.admit(0, prompt)
    harness.finish(0)
    hit = harness.admit(1, prompt)
    assert hit.num_tokens == (length - 1) // BS * BS


# Routing replay: forced ids per token, [tokens, LAYERS, TOP_K], drawn from a tiny alphabet so that
# two recordings often agree on a leading block and differ after.
forced_tables = st.lists(st.integers(0, 1), min_size=3 * BS, max_size=3 * BS).map(
    lambda bits: np.repeat(np.asarray(bits, np.int64)[:, None, None], LAYERS * TOP_K).reshape(3 * BS, LAYERS, TOP_K))


def blocks_routed_alike(a: np.ndarray | None, b: np.ndarray | None, blocks: int) -> int:
    """Leading blocks whose forced ids agree (None: the router chose, which agrees only with None)."""
    if a is None or b is None:
        return blocks if a is None and b is None else 0
    n = 0
    while n < blocks and np.array_equal(a[:(n + 1) * BS], b[:(n + 1) * BS]):
        n += 1
    return n


@given(first=st.none() | forced_tables, second=st.none() | forced_tables)
@example(first=np.zeros((3 * BS, LAYERS, TOP_K), np.int64), second=None)
@example(first=np.zeros((3 * BS, LAYERS, TOP_K), np.int64),
         second=np.concatenate([np.zeros((BS, LAYERS, TOP_K), np.int64), np.ones((2 * BS, LAYERS, TOP_K), np.int64)]))
def test_a_replayed_block_is_only_shared_under_the_same_forced_ids(first, second, faults):
    """A prompt's blocks cached while it replayed `first` (or routed freely: None); the same prompt
    replaying `second` hits exactly the leading blocks routed alike, as the oracle counts them."""
    harness, prompt = Harness(8, faults), [4, 5, 6, 7, 8, 9, 1]
    keys = []
    for j, block in enumerate(harness.cache.allocate(3)):
        forced = None if first is None else first[j * BS:(j + 1) * BS]
        keys.append(harness.cache.key(keys[-1] if keys else None, prompt[j * BS:(j + 1) * BS], forced))
        harness.cache.register(block, keys[-1], rows_for(prompt, j))
    hit = harness.cache.lookup(prompt, second)
    assert len(hit.blocks) == blocks_routed_alike(first, second, 3), \
        f"{len(hit.blocks)} blocks hit; forced ids cached {None if first is None else first[:, 0, 0]}, " \
        f"looked up {None if second is None else second[:, 0, 0]}"
