"""Routing problems, the engine's answer to them, and property checks against the float64 reference.

The property checks are plain functions returning a list of problems, so the hypothesis properties
and the planted-fault cases (each failpoint must make a check fail) call the same code.

Near-ties: the reference gives every expert's deciding value (logit for softmax_topk, biased score
for noaux_tc). A routing row is correct when it holds k distinct ids in range and some resolution of
the near-ties under the project's one rule (`NEAR_TIE`) chooses it: group cut first, then the k-th
expert inside the kept groups (`verifier.routing`). `verifier.tolerance.routing_bounds` summarises
which experts are contested, for the statistics the properties report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import paddle
import router_reference as ref_router

from engine.failpoints import NO_FAULTS, Failpoints
from engine.moe import router
from verifier.compare import compare
from verifier.dumps import routing_violations
from verifier.tolerance import ROUTER_WEIGHTS, group_bounds, routing_bounds


@dataclass(frozen=True)
class Case:
    """One routing problem. `logits` include the padding rows when `num_real` is set."""

    kind: str  # "softmax_topk" | "noaux_tc"
    logits: np.ndarray  # [T, E] float32
    top_k: int
    norm_topk_prob: bool
    bias: np.ndarray | None = None  # [E] float32 (noaux_tc)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_real: int | None = None

    @property
    def real(self) -> int:
        return self.logits.shape[0] if self.num_real is None else self.num_real


def route(case: Case, faults: Failpoints = NO_FAULTS, num_real="case"):
    """Engine routing as NumPy (ids [T, k], weights [T, k])."""
    num_real = case.num_real if num_real == "case" else num_real
    logits = paddle.to_tensor(case.logits)
    if case.kind == "softmax_topk":
        out = router.softmax_topk(logits, top_k=case.top_k, norm_topk_prob=case.norm_topk_prob,
                                  num_real=num_real, faults=faults)
    else:
        bias = None if case.bias is None else paddle.to_tensor(case.bias)
        out = router.noaux_tc(logits, bias, top_k=case.top_k, n_group=case.n_group,
                              topk_group=case.topk_group, norm_topk_prob=case.norm_topk_prob,
                              routed_scaling_factor=case.routed_scaling_factor, num_real=num_real,
                              faults=faults)
    return out[0].numpy(), out[1].numpy()


def reference(case: Case) -> ref_router.Routing:
    """The float64 reference on the real rows only."""
    logits = case.logits[: case.real]
    if case.kind == "softmax_topk":
        return ref_router.softmax_topk(logits, top_k=case.top_k, norm_topk_prob=case.norm_topk_prob)
    return ref_router.noaux_tc(logits, case.bias, top_k=case.top_k, n_group=case.n_group,
                               topk_group=case.topk_group, norm_topk_prob=case.norm_topk_prob,
                               routed_scaling_factor=case.routed_scaling_factor)


def bounds(ref: ref_router.Routing) -> tuple[np.ndarray, np.ndarray]:
    """(must, must_not) [T, E]: the experts every correct routing chooses / none chooses."""
    return routing_bounds(ref.scores, ref.ids.shape[1], ref.kept_groups.shape[1], ref.topk_group)


def contested_rows(ref: ref_router.Routing) -> np.ndarray:
    """[T] bool: tokens with at least one near-tied (contested) expert."""
    must, must_not = bounds(ref)
    return (~(must | must_not)).any(axis=-1)


# ---------------------------------------------------------------------------- property checks


def check_ids(case: Case, ids, weights, ref) -> list[str]:
    """Real rows hold k distinct ids in [0, E), and each is a routing that the reference's deciding
    values admit under some resolution of their near-ties (verifier/routing.py): a -1, a repeated
    or an out-of-range id fails before any near-tie is considered."""
    failures = routing_violations(ids[: case.real], ref.scores, ref.kept_groups.shape[1], ref.topk_group)
    return [f"token {f.row}: ids {list(f.ids)} vs reference {sorted(ref.ids[f.row].tolist())}: {f.reason} "
            f"(margin {ref.margin[f.row]:.3g})" for f in failures]


def check_weights(case: Case, ids, weights, ref) -> list[str]:
    """Where the id sets agree with the reference, weights agree within ROUTER_WEIGHTS."""
    ids, weights = ids[: case.real], weights[: case.real]
    same = (np.sort(ids, axis=-1) == np.sort(ref.ids, axis=-1)).all(axis=-1)
    got = np.take_along_axis(weights, np.argsort(ids, axis=-1), axis=-1)[same]
    want = np.take_along_axis(ref.weights, np.argsort(ref.ids, axis=-1), axis=-1)[same]
    return _close("weights vs reference", got, want, np.flatnonzero(same))


def check_weight_formula(case: Case, ids, weights, ref=None) -> list[str]:
    """Weights are the unbiased scores of the experts the engine chose, renormalised when
    norm_topk_prob, times the scaling factor: the bias selects, it never weighs. Independent of
    ties, because it is computed from the engine's own ids."""
    ids, weights = ids[: case.real], weights[: case.real]
    score = ref_router.softmax if case.kind == "softmax_topk" else ref_router.sigmoid
    scores = score(case.logits[: case.real])  # [T, E] float64, unbiased
    want = np.take_along_axis(scores, np.clip(ids, 0, scores.shape[1] - 1), axis=-1)
    if case.norm_topk_prob:
        want = want / (want.sum(axis=-1, keepdims=True) + ref_router.RENORM_EPS)
    return _close("weight formula", weights, want * case.routed_scaling_factor, np.arange(len(ids)))


def check_kept_groups(case: Case, ids, weights, ref) -> list[str]:
    """No chosen expert lies in a group the reference drops decisively (outside a group near-tie)."""
    group_size = case.logits.shape[1] // case.n_group
    ids = ids[: case.real]
    in_range = (ids >= 0) & (ids < case.logits.shape[1])  # the others are check_ids' failures
    groups = np.where(in_range, ids, 0) // group_size  # [T, k]
    _, dropped = group_bounds(ref.scores, case.n_group, case.topk_group)  # [T, G]
    bad = (np.take_along_axis(dropped, groups, axis=-1) & in_range).any(axis=-1)
    return [f"token {row}: experts {ids[row].tolist()} outside kept groups "
            f"{np.flatnonzero(ref.kept_groups[row]).tolist()}" for row in np.flatnonzero(bad)]


def check_padding(case: Case, ids, weights, ref=None) -> list[str]:
    """Rows >= num_real are exactly id -1 and weight 0."""
    pad_ids, pad_weights = ids[case.real:], weights[case.real:]
    bad = (pad_ids != -1).any(axis=-1) | (pad_weights != 0).any(axis=-1)
    return [f"padding row {case.real + row}: ids {pad_ids[row].tolist()} weights "
            f"{pad_weights[row].tolist()}" for row in np.flatnonzero(bad)]


CHECKS = (check_ids, check_weights, check_weight_formula, check_kept_groups, check_padding)


def routing_problems(case: Case, faults: Failpoints = NO_FAULTS, checks=CHECKS) -> list[str]:
    """The given property checks on one routed case; empty means correct."""
    ids, weights = route(case, faults)
    ref = reference(case)
    return [problem for check in checks for problem in check(case, ids, weights, ref)]


def _close(what, got, want, rows) -> list[str]:
    """One problem naming the worst element unless `got` is within ROUTER_WEIGHTS of `want`."""
    result = compare(np.asarray(got, np.float64), np.asarray(want, np.float64), ROUTER_WEIGHTS, name=what)
    if result.passed:
        return []
    row, slot = result.first_mismatch_index
    return [f"{what}: {result.mismatches} mismatches, first at token {rows[row]} slot {slot}: "
            f"{float(got[row, slot])!r} vs {float(want[row, slot])!r}"]


# ---------------------------------------------------------------------------- padding


# Padding rows hold garbage, as a reused static buffer would: it must never reach the real rows.
PADDING_VALUES = (1e30, -np.inf, 7.0)


def pad(case: Case, rows: int, value: float) -> Case:
    """`case` with `rows` padding rows of NaN and `value` appended, and num_real set."""
    garbage = np.full((rows, case.logits.shape[1]), np.nan, dtype=np.float32)
    garbage[:, ::2] = value
    return replace(case, logits=np.concatenate([case.logits, garbage]), num_real=case.logits.shape[0])


def unpadded(case: Case) -> Case:
    """The real rows of `case` alone, without num_real."""
    return replace(case, logits=case.logits[: case.real], num_real=None)
