"""The gate's fail-fast order: which cases xdist hands out first (cases/conftest.py applies it;
`--gate-order xdist` turns it off to measure the difference, bench/first_failure.py)."""

from __future__ import annotations

# A broken change should fail within a minute even though the whole gate takes minutes. With
# `--dist loadgroup` xdist hands out work in "scopes" (an xdist_group is one scope, every other case
# is a scope of its own) in the order the workers collected them, and by default first re-sorts the
# scopes by size, which starts every big group (graph-*, four_ranks, routing_replay) before any
# single cheap case: router.mask_fill_zero then failed after 245 s, r3.write_in_place after 183 s
# (bench/results/first-failure-*-both.json; 14 s and 9 s in this order). So the order below is
# applied at collection (the same, deterministic, on every worker, as xdist requires) and the
# re-sort is switched off (cases/conftest.py's pytest_configure).
#
# The tiers, from bench/results/detector-census-20261129.md (which cases fail for which failpoint)
# and the gate's per-case times (bench/gate_bench.py):
#   0  the four_ranks group (test_parallel*.py, test_routing_replay_ranks.py): the longest serial
#      share of the gate (~130 s on one worker), so it must start at once, and the only detector of
#      several dist.* classes; its widest detectors (LEAD_DETECTORS) run first;
#   1  cheap cases that detect the most failpoints per second, on the other workers meanwhile: the
#      NumPy recorder/second_*/router/toy-graph checks (under a second to ten seconds a file), then
#      the small-engine reference cases (golden, second_*, batching), between them detecting every
#      router.* class and most graph.*/kv.*/r3.*/dist.* classes;
#   2  the other xdist groups, the largest first (a group started late bounds the wall time), each
#      with its widest detector first;
#   3  slow single cases (subprocess gates, 4-rank launches), longest first for balance;
#   4  everything else (cheap, few or no failpoints), in collection order.
HEAD_GROUPS = ("four_ranks",)
FIRST_FILES = (  # tier 1, by failpoints detected per second (idle gate seconds of the file in brackets);
    # of the larger files only the census' detectors: the rest of them runs in tier 4
    "test_routing_replay_recorder.py",  # [0.5] r3.skip_in_graph, trace_time_only, record_padding, rank_skews_ids
    "test_prefix_cache.py",  # [1] every prefix.* class, against a brute-force oracle (40-46 s when last in tier 1)
    "test_truth_positions.py",  # [0.1] rotary.float32_angles (35 s when last in tier 1)
    "test_second_mask_fill.py", "test_second_route_padding.py",  # [0.1 each] router.mask_fill_zero, moe.route_padding
    "test_second_every_rank_writes.py", "test_second_write_in_place.py",  # [0.1 each] r3.every_rank_writes, write_in_place
    "test_router.py::test_noaux_tc_matches_reference", "test_router.py::test_softmax_topk_matches_reference",
    "test_router.py::test_planted", "test_router.py::test_skip_renorm_is_detected",  # every router.* class
    "test_router.py::test_all_rows_padding_and_default_faults", "test_router.py::test_bias_selects_but_never_weighs",
    "test_second_graph_reference.py",  # [5] kv.stale_block_table, kv.write_padded_rows (else only in graph-*)
    "test_probes_replay.py",  # [10] r3.replay_layer_off_by_one (its only detector)
    "test_graph_toy.py::test_toy_steps_pad", "test_graph_toy.py::test_toy_runner_hands_out",  # graph.*
    "test_graph_toy.py::test_toy_runner_captures_each_size_once",
    "test_second_fused_bound.py", "test_second_chunk_positions.py",  # [1, 6] dist.fused_bound_off_by_one, rotary.*
    "test_seed_regression.py", "test_golden.py", "test_second_copy_outputs.py", "test_batching.py",  # [0.5, 4, 4, 4]
    "test_routing_replay_store.py::test_sigkill_mid_write", "test_routing_replay_store.py::test_exactly_one_rank_writes",
    "test_watchdog.py::test_a_disagreeing_rank_is_named_by_the_agreement_check",  # dist.skip_agreement_check
)
GROUPS_FIRST = ("routing_replay", "graph-glm4_moe", "graph-glm4_moe_nobias", "graph-qwen3_moe")
LEAD_DETECTORS = (  # inside a group: the case that detects the most failpoints runs first
    "test_parallel.py::test_four_ranks_match_one_rank[glm4_moe-",  # dist.skip_allreduce, double_scale, wrong_expert_map, rank_disagrees
    "test_parallel.py::test_rank_that_disagrees_is_an_error_not_a_hang",  # dist.skip_agreement_check (76 s if last)
    "test_parallel.py::test_four_ranks_match_one_rank",
    "test_graph.py::test_graph_step_matches_eager",
    "test_routing_replay_engine.py::test_graph_recording_equals_eager_recording",
    "test_routing_replay_engine.py::test_replaying_a_run_reproduces_its_logits_bitwise",
)
SLOW_SINGLES = (  # tier 3, longest first: they bound the tail of the run if they start late
    "test_launch.py", "test_verifier_cli.py", "test_cli_ranks.py", "test_selftest.py", "test_cli.py",
)


def _position(nodeid: str, names: tuple[str, ...]) -> int | None:
    """Index of the first of `names` that `nodeid` (cases/FILE::TEST[...]) starts with, else None."""
    path, sep, rest = nodeid.partition("::")
    local = path.rsplit("/", 1)[-1] + sep + rest
    for index, name in enumerate(names):
        if local.startswith(name):
            return index
    return None


def _group(item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    if marker is None:
        return None
    return marker.args[0] if marker.args else marker.kwargs.get("name")


def gate_order_key(item, size_of_group: dict[str, int]) -> tuple:
    """The sort key of one case: (tier, rank inside the tier, ...); ties keep collection order."""
    group = _group(item)
    if group is not None:
        lead = _position(item.nodeid, LEAD_DETECTORS)
        inside = (0 if lead is not None else 1, lead or 0)
        if group in HEAD_GROUPS:
            return (0, HEAD_GROUPS.index(group), 0, "", *inside)
        named = GROUPS_FIRST.index(group) if group in GROUPS_FIRST else len(GROUPS_FIRST)
        return (2, named, -size_of_group[group], group, *inside)
    first = _position(item.nodeid, FIRST_FILES)
    if first is not None:
        return (1, first)
    slow = _position(item.nodeid, SLOW_SINGLES)
    if slow is not None:
        return (3, slow)
    return (4, 0)


def sort_items(items: list) -> None:
    """Sort pytest's collected items in place into the fail-fast order (deterministic: every
    xdist worker must collect the same order)."""
    sizes: dict[str, int] = {}
    for item in items:
        group = _group(item)
        if group is not None:
            sizes[group] = sizes.get(group, 0) + 1
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (*gate_order_key(item, sizes), order[id(item)]))
