"""The split of a sharded gate (verifier/shards.py), as pure properties over drawn collections.

For a drawn collection (nodeids, some in xdist groups), drawn durations (some cases unknown) and a
drawn N, each shard's selection is computed on its own, as each CI job does. The oracles are
restated here from the contract: the N selections partition the collection; a group lands whole;
the order of collection does not matter; the recorded load of the heaviest shard is at most
total / N + the heaviest unit (greedy list scheduling's bound); a unit the durations do not know
goes to 1 + (first 8 bytes of sha256(key), big-endian) mod N, and adding one never moves another.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verifier.shards import Shard, select

pytestmark = pytest.mark.gate_area("verifier")

GROUPS = [None, None, None, "four_ranks", "probe_ranks", "two_rank_cli", "graph-glm4_moe"]


@st.composite
def collections(draw):
    """(cases as (nodeid, group), durations {nodeid: s}, N)."""
    names = draw(st.lists(st.text("abcdefgh_", min_size=1, max_size=6), min_size=0, max_size=40, unique=True))
    cases = [(f"cases/test_{name}.py::test_{name}", draw(st.sampled_from(GROUPS))) for name in names]
    known = draw(st.lists(st.sampled_from([n for n, _ in cases]), unique=True) if cases else st.just([]))
    durations = {nodeid: draw(st.floats(0, 120, allow_nan=False)) for nodeid in known}
    return cases, durations, draw(st.integers(1, 8))


def selections(cases, durations, count):
    return [select(cases, Shard(i, count), durations) for i in range(1, count + 1)]


def units(cases):
    """Oracle's units: group name -> members, and each lone case its own unit."""
    grouped: dict[str, list[str]] = {}
    for nodeid, group in cases:
        grouped.setdefault(f"group:{group}" if group else nodeid, []).append(nodeid)
    return grouped


def shard_of(nodeid, parts):
    return next(i + 1 for i, part in enumerate(parts) if nodeid in part)


@given(collections())
def test_the_shards_partition_the_collection(drawn):
    cases, durations, count = drawn
    parts = selections(cases, durations, count)
    every = [nodeid for part in parts for nodeid in part]
    assert sorted(every) == sorted(n for n, _ in cases), "a case dropped, or run by two shards"


@given(collections())
def test_an_xdist_group_lands_whole_in_one_shard(drawn):
    cases, durations, count = drawn
    parts = selections(cases, durations, count)
    for key, members in units(cases).items():
        assert len({shard_of(m, parts) for m in members}) == 1, f"{key} split across shards"


@given(collections(), st.randoms(use_true_random=False))
def test_the_split_depends_on_the_cases_not_their_order(drawn, random):
    cases, durations, count = drawn
    shuffled = list(cases)
    random.shuffle(shuffled)
    assert selections(shuffled, durations, count) == selections(cases, durations, count)


@given(collections())
def test_recorded_loads_are_balanced_within_the_greedy_bound(drawn):
    cases, durations, count = drawn
    parts = selections(cases, durations, count)
    loads = [sum(durations.get(n, 0.0) for n in part) for part in parts]
    weights = [sum(durations.get(m, 0.0) for m in members) for members in units(cases).values()]
    bound = sum(durations.values()) / count + max(weights, default=0.0)
    assert max(loads) <= bound + 1e-9, f"loads {loads} over the bound {bound}"


def _hash_shard(key: str, count: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % count + 1


@given(collections())
def test_units_the_durations_do_not_know_are_placed_by_a_stable_hash(drawn):
    cases, durations, count = drawn
    parts = selections(cases, durations, count)
    for key, members in units(cases).items():
        if not any(m in durations for m in members):
            assert shard_of(members[0], parts) == _hash_shard(key, count), key


@given(collections())
def test_a_new_unknown_case_moves_no_other_case(drawn):
    cases, durations, count = drawn
    before = selections(cases, durations, count)
    after = selections(cases + [("cases/test_new.py::test_brand_new", None)], durations, count)
    for nodeid, _ in cases:
        assert shard_of(nodeid, before) == shard_of(nodeid, after), nodeid


def test_the_hash_is_the_same_on_every_machine():
    # sha256(b"cases/test_graph.py::test_x") starts 0x86383aa7f0eb5633, which is 3 mod 4: shard 4/4.
    # Kept literal, so a change to the placement rule (or Python's salted hash()) shows here.
    key = "cases/test_graph.py::test_x"
    assert [select([(key, None)], Shard(i, 4), {}) for i in range(1, 5)] == [set(), set(), set(), {key}]


@pytest.mark.parametrize("text", ["0/4", "5/4", "2", "a/b", "2/0", "-1/3"])
def test_a_bad_shard_is_refused_by_name(text):
    with pytest.raises(ValueError, match="shard"):
        Shard.parse(text)
