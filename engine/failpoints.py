"""Named, off-by-default fault injections that reproduce real bug classes.

A failpoint is a deliberate bug the gate must catch. Each one is switched on
by name through a `Failpoints` value that is handed down explicitly (from the
CLI or a test), never read from a global, so two tests in one process can run
with different faults. `python -m verifier selftest` runs the gate with each
failpoint on and requires at least one case to fail.
"""

from __future__ import annotations

from dataclasses import dataclass

# name -> the bug it plants. Add an entry here before using a new name.
KNOWN: dict[str, str] = {
    # MoE routing (engine/moe/router.py)
    "router.bias_in_weights": "noaux_tc gathers weights from the biased scores instead of the unbiased ones",
    "router.group_score_max": "noaux_tc scores each group by its max instead of the sum of its top-2 scores",
    "router.mask_fill_zero": "noaux_tc fills masked groups with 0 instead of -inf",
    "router.bias_absent_crash": "noaux_tc adds the correction bias even when the checkpoint has none (None in arithmetic: the seed's crash)",
    "router.skip_renorm": "top-k weights are not renormalised even when norm_topk_prob is set",
    # MoE block and attention (engine/models/moe_decoder.py)
    "moe.route_padding": "the router is not told which rows are padding, so padded rows pick real experts",
    "attention.drop_cached_prefix": "a prefill chunk attends only to its own tokens, not to the cached prefix",
    # Graph runner (engine/graph/runner.py)
    "graph.round_down": "a step is padded to the largest capture size below its token count, not above",
    "graph.copy_outputs": "replays hand out fresh copies instead of the static output buffers",
    "graph.stale_padding": "padded rows of the input buffers keep whatever the previous step left there",
    # Step inputs the runner derives from the batch (engine/runner.py)
    "kv.slot_off_by_one": "new tokens' k/v are written one cache slot past where attention reads them",
    "rotary.chunk_positions_from_zero": "a prefill chunk after a cached prefix gets positions from 0, not from the prefix length",
    "kv.stale_block_table": "a whole-step decode graph reads a block table missing the sequence's newest block",
    # Graph replays and the whole-step decode graph (engine/graph/runner.py, engine/models/moe_decoder.py)
    "graph.stale_positions": "a replay reads the positions buffer as the capture left it instead of this step's",
    "kv.write_padded_rows": "a whole-step decode replay writes its padded rows' k/v into the cache (at slot 0)",
    # Tensor / expert parallelism (engine/models/moe_decoder.py, engine/runner.py)
    "dist.fused_bound_off_by_one": "the fused all-reduce + residual + norm path is also taken one token above its bound",
    "dist.skip_allreduce": "the all-reduce after the attention output projection is skipped",
    "dist.wrong_expert_map": "each EP rank computes its experts as if it held the next rank's experts",
    "dist.double_scale": "the routed_scaling_factor is applied again when experts' shares are combined",
    "dist.rank_disagrees": "rank 1 runs a step eagerly while the other ranks replay a graph",
    # Routing replay (engine/routing_replay/)
    "r3.skip_in_graph": "the routing recorder skips steps that capture or replay a graph (the seed bug)",
    "r3.trace_time_only": "routing is recorded as a trace-time Python side effect: replayed steps record nothing",
    "r3.record_padding": "the host copies a replay's padded rows into the request's table as well",
    "r3.write_in_place": "routing files are written in place at their final path, not via temp file + rename",
    "r3.every_rank_writes": "every rank writes each routing file, not rank 0 alone",
    "r3.rank_skews_ids": "rank 1 records every expert id one higher than the other ranks do",
    "r3.replay_layer_off_by_one": "routing replay routes the last MoE layer by the previous MoE layer's recorded ids",
    # Precision (engine/models/moe_decoder.py): within the float32 row, caught against a float64 truth
    "norm.eps_outside_sqrt": "the captured pieces of the sparse form apply the final RMSNorm with the epsilon added outside the square root",
    "rotary.float32_angles": "a float64 engine computes its rotary angles as float32 position times float32 inverse frequency",
    # Rank agreement (engine/runner.py)
    "dist.skip_agreement_check": "ranks do not compare their step plans before running the step",
    # Prefix cache (engine/prefix_cache.py, engine/scheduler.py)
    "prefix.stale_after_evict": "an evicted block keeps its hash entry, so a later hit reads KV another request overwrote",
    "prefix.hash_no_parent": "a block's hash omits its parent's, so a block with the same tokens after another prefix hits",
    "prefix.routing_rows_missing": "a hit hands the request zero-filled routed-expert rows for its cached tokens",
    "prefix.hit_covers_last_token": "a hit may cover the last prompt token, whose logits then are never computed",
    "prefix.ranks_disagree": "rank 1 never hits the prefix cache while the other ranks do",
    "prefix.key_ignores_replay": "a replayed request's block keys omit the ids it routes by, so a replay of other ids hits its KV",
}


# The start of the announcement line; followed by `Failpoints.names`, or "none".
ANNOUNCEMENT = "failpoints: "


@dataclass(frozen=True)
class Failpoints:
    """The set of faults switched on for one engine (empty by default)."""

    active: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.active) - KNOWN.keys())
        if unknown:
            raise ValueError(f"unknown failpoint(s) {unknown}; known: {sorted(KNOWN)}")

    @classmethod
    def parse(cls, text: str | None) -> "Failpoints":
        """Build from a comma-separated list such as "router.skip_renorm,a.b"."""
        names = [n.strip() for n in (text or "").split(",") if n.strip()]
        return cls(frozenset(names))

    @property
    def names(self) -> str:
        """The planted names, sorted and comma-separated ("" when none): what `parse` reads back."""
        return ",".join(sorted(self.active))

    def announcement(self) -> str:
        """The line every process that runs engine code prints (to its log) and the value it puts
        in its reply or summary, so that a case can see which faults reached it. The gate's
        meta-case (cases/test_failpoint_reach.py) reads it back."""
        return f"{ANNOUNCEMENT}{self.names or 'none'}"

    def with_(self, other: "Failpoints") -> "Failpoints":
        """These faults and `other`'s: a request to a warm server adds its own to the run's."""
        return Failpoints(self.active | other.active)

    def on(self, name: str) -> bool:
        if name not in KNOWN:
            raise KeyError(f"failpoint {name!r} is not declared in engine/failpoints.py")
        return name in self.active


NO_FAULTS = Failpoints()
