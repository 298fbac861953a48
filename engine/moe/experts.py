"""Routed and shared experts in two static-shape forms: `dense` (the reference) and `sparse`.

`dense`: every expert runs on every row and a [T, E] combine matrix, zero where a row did not pick
the expert, weights the results. No shape depends on the routing; padded rows carry id -1 and
weight 0 and add nothing. It costs E/k times the useful FLOPs. Layout: the experts' gate and up
projections side by side in one [H, E*I] matrix each, the down projections stacked in [E*I, H], so
each projection is one plain GEMM and the sum over experts happens inside the down GEMM.

`sparse`: the T*k (row, expert) assignments are sorted by expert into E buckets of a fixed
capacity C (derived from T alone, see `expert_capacity`), one batched GEMM per projection runs over
the [E, C, H] buckets, and each assignment gathers its result row back. Sorting, bucket starts
(`searchsorted`) and the gathers have shapes fixed by T, so the form is capturable: no nonzero,
masked_select or host read. Layout: [E, H, I] gate and up, [E, I, H] down (`pack_experts`).

That fixed-capacity path is what graph pieces run (`fixed_shapes`, set by the model's graph
views). Eager steps take `exact_routed_experts` instead: they may read the per-expert counts on the
host, so each expert computes exactly its rows (about the useful FLOPs), with no capacity at all.

Overflow of the fixed capacity (an expert picked by more than C rows) is never dropped silently.
Called eagerly, the capacity path reads the bucket sizes on the host and runs one more pass over
bucket positions C.. up to the longest bucket: exact. Inside a traced program no host read is possible;
there the overflow turns the whole output into NaN (loud, never a plausible wrong answer), and the
runner, which checks `buckets_overflow` on the step's expert ids after every replay, re-runs the
step eagerly and counts it as a fallback: exact again, at eager cost for that step.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F

from engine.config import MoEForm
from engine.layers.indices import arange

CAPACITY_FACTOR = 1.25  # bucket size as a multiple of the balanced share T*k/E (the cost above useful FLOPs)
MIN_CAPACITY = 16  # small steps: a bucket holds every row, so they can never overflow
# Exact form: loop over experts unless a pass padded to the longest bucket would be at least this
# full (useful rows / padded rows). Measured (bench/moe_forms.py, H 512, I 128, top-8): the loop ran
# at the padded pass's rate per useful row at 2048-8192 tokens, and won 1.4-4x where fill was <= 0.76;
# the padded pass won only near 0.86 (by 0-13%). Measured under load (load average 6-21) while the
# rule was being chosen: bench/results/moe-forms-20261129-1243.jsonl's `auto_picks_loop` column is
# from an earlier threshold.
LOOP_BELOW_FILL = 0.85
# ... and unless the loop's per-expert cost outweighs the padding. Few rows (decode, short prefills)
# spread over many experts make each expert's GEMM chain a handful of rows, and its cost is then the
# five kernel calls from Python (about 45 us on the 2-core Intel Xeon) plus reading the expert's
# weights; the padded pass makes a fixed number of calls and reads every expert's weights. In units
# of one row's GEMM work in an expert (H 512, I 128: 0.4 MFLOP, about 1.3 us): a loop step costs
# EXPERT_CALL_ROWS per non-empty expert, reading one expert's weights in the pass EXPERT_READ_ROWS.
# Measured there (python -m bench.moe_forms --tokens 1,2,4,16,128): at 16 rows (57 of 64 experts
# non-empty) the loop took about twice the pass's time, at 1 row (8 experts) half of it.
EXPERT_CALL_ROWS = 48
EXPERT_READ_ROWS = 13
# The loop's per-expert inputs: views into the sorted rows from this many routed rows up (a split
# copies them all, 4.5 ms at 2048 tokens x top-8 on one thread; a view slice costs ~2.5 us per expert)
SLICE_ROWS = 1024


def expert_capacity(num_rows: int, top_k: int, num_experts: int) -> int:
    """Bucket size for T = num_rows padded rows: CAPACITY_FACTOR * T*k/E, at least MIN_CAPACITY,
    at most T (a row picks an expert at most once, so C = T can never overflow)."""
    balanced = math.ceil(CAPACITY_FACTOR * num_rows * top_k / num_experts)
    return min(num_rows, max(balanced, MIN_CAPACITY))


def pack_experts(gates: list[np.ndarray], ups: list[np.ndarray], downs: list[np.ndarray],
                 form: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hub per-expert weights (gate/up [I, H], down [H, I]) -> (gate, up, down) in `form`'s layout."""
    if form == MoEForm.SPARSE:
        return (np.stack([g.T for g in gates]), np.stack([u.T for u in ups]),
                np.stack([d.T for d in downs]))  # [E, H, I], [E, H, I], [E, I, H]
    return (np.concatenate([g.T for g in gates], axis=1), np.concatenate([u.T for u in ups], axis=1),
            np.concatenate([d.T for d in downs], axis=0))  # [H, E*I], [H, E*I], [E*I, H]


def routed_experts(x: paddle.Tensor, ids: paddle.Tensor, weights: paddle.Tensor, num_experts: int,
                   gate: paddle.Tensor, up: paddle.Tensor, down: paddle.Tensor,
                   form: str = "dense", fixed_shapes: bool = True) -> paddle.Tensor:
    """x [T, H]; ids, weights [T, k] with ids in [0, num_experts) or outside it (no expert, e.g. -1
    for padding or another rank's expert) -> [T, H], the sum over the chosen experts of
    weight * expert(x). gate/up/down in `form`'s layout (`pack_experts`). The sparse form runs at
    a fixed capacity when `fixed_shapes` (graph pieces), and exactly sized on the host otherwise
    (eager steps only: `exact_routed_experts`). (The default is spelled out: to_static's AST mode
    cannot resolve a module constant in a default.)"""
    if form == MoEForm.SPARSE:
        if fixed_shapes:
            return sparse_routed_experts(x, ids, weights, num_experts, gate, up, down)
        return exact_routed_experts(x, ids, weights, num_experts, gate, up, down)
    return dense_routed_experts(x, ids, weights, num_experts, gate, up, down)


def combine_matrix(ids: paddle.Tensor, weights: paddle.Tensor, num_experts: int) -> paddle.Tensor:
    """ids/weights [T, k] -> [T, E] with weights[t, j] at column ids[t, j]; id -1 matches no column."""
    experts = arange(num_experts, ids.dtype)  # [E]
    hits = (ids.unsqueeze(-1) == experts).astype(weights.dtype)  # [T, k, E]
    return (hits * weights.unsqueeze(-1)).sum(axis=1)


def dense_routed_experts(x, ids, weights, num_experts, gate, up, down) -> paddle.Tensor:
    """The dense form: gate, up [H, E*I]; down [E*I, H]; expert e owns columns/rows [e*I, (e+1)*I)."""
    combine = combine_matrix(ids, weights, num_experts)  # [T, E]
    act = F.silu(paddle.matmul(x, gate)) * paddle.matmul(x, up)  # [T, E*I]
    weighted = act.reshape([x.shape[0], num_experts, -1]) * combine.unsqueeze(-1)  # [T, E, I]
    return paddle.matmul(weighted.reshape([x.shape[0], -1]), down)


def sparse_routed_experts(x, ids, weights, num_experts, gate, up, down) -> paddle.Tensor:
    """The sparse form: gate, up [E, H, I]; down [E, I, H]. Exact eagerly; NaN on overflow when traced."""
    t, k = ids.shape
    capacity = expert_capacity(t, k, num_experts)
    plan = _sort_by_expert(ids, num_experts)
    rows, overflow = _bucket_pass(x, plan, 0, capacity, num_experts, gate, up, down)  # [T*k, H]
    if paddle.in_dynamic_mode() and int(overflow.item()) > 0:  # eager: one more pass, sized on the host
        _, _, _, starts = plan
        longest = int((starts[1:] - starts[:-1]).max().item())
        more, _ = _bucket_pass(x, plan, capacity, longest - capacity, num_experts, gate, up, down)
        rows = rows + more  # each assignment is non-zero in exactly one of the two passes
    elif not paddle.in_dynamic_mode():  # traced: no host read possible; poison rather than drop
        rows = rows + paddle.where(overflow > 0, paddle.full([1], float("nan"), rows.dtype),
                                   paddle.zeros([1], rows.dtype))
    return (rows.reshape([t, k, -1]) * weights.unsqueeze(-1)).sum(axis=1)  # [T, H]


def exact_routed_experts(x, ids, weights, num_experts, gate, up, down, loop: bool | None = None) -> paddle.Tensor:
    """The sparse form sized on this step's expert counts, read on the host: eager only (a traced
    program raises RuntimeError; it has no counts to read). Same weights layout as the sparse form.
    `loop` (None: `prefer_loop` decides): one GEMM chain per non-empty expert on its exact rows,
    else one batched pass over buckets as long as the longest one."""
    if not paddle.in_dynamic_mode():
        raise RuntimeError("exact_routed_experts reads expert counts on the host: inside a traced program "
                           "use the fixed-capacity sparse form (routed_experts(..., fixed_shapes=True))")
    t, k = ids.shape
    plan = _sort_by_expert(ids, num_experts)
    bounds = plan[3].numpy()  # [E+1] bucket starts: the host read this form is allowed
    sizes = bounds[1:] - bounds[:-1]  # [E] assignments per expert
    if bounds[-1] == 0:  # no row picked one of these experts (padding, or only another rank's)
        return paddle.zeros_like(x)
    if loop if loop is not None else prefer_loop(sizes):
        rows = _segment_loop(x, plan, bounds, gate, up, down)
    else:
        rows, _ = _bucket_pass(x, plan, 0, int(sizes.max()), num_experts, gate, up, down)
    return (rows.reshape([t, k, -1]) * weights.unsqueeze(-1)).sum(axis=1)  # [T, H]


def prefer_loop(sizes: np.ndarray) -> bool:
    """Whether a loop over the non-empty experts beats one batched pass padded to the longest
    bucket, for these per-expert assignment counts: the pass's buckets are well filled
    (LOOP_BELOW_FILL), or the loop's calls cost more than the pass's padding (EXPERT_CALL_ROWS)."""
    total, longest = sizes.sum(), sizes.max()
    if total >= LOOP_BELOW_FILL * sizes.size * longest:
        return False
    loop_cost = np.count_nonzero(sizes) * EXPERT_CALL_ROWS + total
    return loop_cost < sizes.size * (longest + EXPERT_READ_ROWS)


def _segment_loop(x, plan, bounds: np.ndarray, gate, up, down) -> paddle.Tensor:
    """[A, H] expert outputs in assignment order (zero for unrouted assignments), one GEMM chain
    per non-empty expert over its contiguous run of rows sorted by expert."""
    order = plan[0]
    a, routed, k = order.shape[0], int(bounds[-1]), order.shape[0] // x.shape[0]
    xs = paddle.index_select(x, order[:routed] // k)  # [R, H] source rows, sorted by expert
    used = np.flatnonzero(bounds[1:] > bounds[:-1])
    if len(used) == 1:
        runs = [xs]
    elif routed >= SLICE_ROWS:  # row slices are views; a split copies every row (2048 tokens: 4.5 ms)
        runs = [xs[int(lo):int(hi)] for lo, hi in zip(bounds[used], bounds[used + 1])]
    else:  # few rows: one split for all experts' runs (one call, not one slice per expert)
        runs = paddle.split(xs, [int(n) for n in bounds[used + 1] - bounds[used]])
    outs = []
    for e, xe in zip(used, runs):
        outs.append(paddle.matmul(F.silu(paddle.matmul(xe, gate[e])) * paddle.matmul(xe, up[e]), down[e]))
    outs.append(paddle.zeros([1, x.shape[1]], x.dtype))  # row R: "routed to no expert here"
    sorted_slot = paddle.minimum(arange(a), paddle.full([a], routed, "int64"))
    slot = paddle.scatter(paddle.zeros_like(sorted_slot), order, sorted_slot)  # [A] inverse of the sort
    return paddle.index_select(paddle.concat(outs), slot)


def overflow_count(ids: paddle.Tensor, num_experts: int) -> paddle.Tensor:
    """[1] int64: assignments of `ids` [T, k] beyond their expert's bucket capacity (graph-safe), for
    cases and benchmarks; the runner's host-side check after a replay is `buckets_overflow`."""
    t, k = ids.shape
    plan = _sort_by_expert(ids, num_experts)
    return _beyond(plan, expert_capacity(t, k, num_experts), num_experts).astype("int64").sum().reshape([1])


def buckets_overflow(ids: np.ndarray, num_experts: int, num_local: int) -> bool:
    """Host-side, after a replay: did any expert of any rank get more of the [P, k] `ids` (global,
    padded rows -1) than a bucket of `num_local` experts holds at P rows? The same answer on every
    rank (ids are replicated), so all ranks re-run the step together."""
    counts = np.bincount(ids[(ids >= 0) & (ids < num_experts)], minlength=num_experts)
    return bool(counts.max(initial=0) > expert_capacity(ids.shape[0], ids.shape[1], num_local))


def _sort_by_expert(ids: paddle.Tensor, num_experts: int) -> tuple[paddle.Tensor, ...]:
    """(order, sorted_key, rank): assignment indices sorted by expert (out-of-range ids get key E and
    sort last), their keys, and each sorted assignment's position inside its expert's run."""
    flat = ids.reshape([-1]).astype("int64")  # [A], A = T*k, assignment a = row a // k
    routed = paddle.logical_and(flat >= 0, flat < num_experts)
    key = paddle.where(routed, flat, paddle.full_like(flat, num_experts))
    order = paddle.argsort(key, stable=True)  # [A]
    sorted_key = paddle.gather(key, order)  # [A], non-decreasing
    starts = paddle.searchsorted(sorted_key, arange(num_experts + 1))  # [E+1]
    rank = arange(flat.shape[0]) - paddle.gather(starts, sorted_key)  # [A]
    return order, sorted_key, rank, starts


def _beyond(plan, first: int, num_experts: int) -> paddle.Tensor:
    """[A] bool in sorted order: routed assignments at bucket position >= first."""
    _, sorted_key, rank, _ = plan
    return paddle.logical_and(sorted_key < num_experts, rank >= first)


def _bucket_pass(x, plan, first: int, capacity: int, num_experts: int, gate, up, down):
    """Compute the assignments at bucket positions [first, first + capacity) of every expert.
    Returns ([A, H] rows in assignment order, zero for assignments outside this window;
    [1] count of assignments beyond the window)."""
    order, sorted_key, rank, starts = plan
    a, e, c = order.shape[0], num_experts, capacity
    k = a // x.shape[0]
    # integer index arithmetic: the window offset `first` is left out where it is 0 (the exact form's
    # single pass, the first pass of the fixed-shape form), and so is `rank >= 0`, true of every
    # assignment (rank is its place in its expert's run): three ops fewer, the same integers
    pos = starts[:e].unsqueeze(1) + arange(c).unsqueeze(0)  # [E, C] sorted index
    if first:
        pos = pos + first
    pos = paddle.minimum(pos, paddle.full_like(pos, a - 1))  # slots past a bucket's end read any row; never gathered back
    token = paddle.index_select(order, pos.reshape([-1])) // k  # [E*C] source row of each slot
    xb = paddle.index_select(x, token).reshape([e, c, -1])  # [E, C, H]
    act = F.silu(paddle.bmm(xb, gate)) * paddle.bmm(xb, up)  # [E, C, I]
    out = paddle.bmm(act, down).reshape([e * c, -1])  # [E*C, H]
    out = paddle.concat([out, paddle.zeros([1, out.shape[1]], out.dtype)])  # row E*C: "not in this pass"
    inside = sorted_key < e
    if first:
        inside = paddle.logical_and(inside, rank >= first)
    inside = paddle.logical_and(inside, rank < first + c)
    slot = sorted_key * c + rank - first if first else sorted_key * c + rank
    slot_sorted = paddle.where(inside, slot, paddle.full_like(rank, e * c))  # [A]
    slot = paddle.scatter(paddle.zeros_like(slot_sorted), order, slot_sorted)  # [A] in assignment order
    overflow = _beyond(plan, first + c, num_experts).astype("int64").sum().reshape([1])
    return paddle.index_select(out, slot), overflow  # index_select: 1.6x gather's speed here


def dense_mlp(x: paddle.Tensor, gate: paddle.Tensor, up: paddle.Tensor, down: paddle.Tensor) -> paddle.Tensor:
    """The SwiGLU MLP of dense layers and shared experts: x [T, H]; gate, up [H, I]; down [I, H]."""
    return paddle.matmul(F.silu(paddle.matmul(x, gate)) * paddle.matmul(x, up), down)
