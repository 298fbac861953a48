"""Dump against dump: one run's outputs (engine/dump.py keys) checked against another's or a golden.

Three kinds of output, three rules:
  logits         numerical: element-wise within a Tolerance, and/or relative L2 under a bound
  greedy tokens  exact; the report names the first step where they part
  routed experts exact per token, except the positions the reference marks as near-tied
                 under `verifier.tolerance.NEAR_TIE`: a row whose sets differ only there is
                 reported separately (never hidden, never failed, since float32 rounding may
                 legitimately flip it); a wrong expert anywhere else fails the row.

Near-ties are judged on the deciding values the reference carries beside each routing key:
`{phase}topk_margin_p{i}_layer{L}` [T, E] float64 (router logits for softmax_topk, sigmoid scores
+ correction bias for noaux_tc) and one `topk_margin_grouping` = [n_group, topk_group] per file
(the goldens made by fixtures/build_fixtures.py carry both). Without them every routing difference
is a failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from verifier.compare import Comparison, compare
from verifier.recording import dump_level
from verifier.tolerance import EXACT, NEAR_TIE, NearTie, Tolerance, routing_bounds

ROUTING_KEY = re.compile(r"^(decode_)?topk_ids_p(\d+)_layer(\d+)$")
GROUPING_KEY = "topk_margin_grouping"


@dataclass(frozen=True)
class RoutingDiff:
    key: str
    rows: int
    mismatched_rows: tuple[int, ...]  # rows with a wrong expert outside the near-tied positions
    near_tie_rows: tuple[int, ...]  # rows whose sets differ only at near-tied positions

    @property
    def passed(self) -> bool:
        return not self.mismatched_rows


@dataclass
class DumpDiff:
    """Every comparison made between two dumps, and the verdict."""

    comparisons: list[Comparison] = field(default_factory=list)
    rel_l2_failures: list[str] = field(default_factory=list)
    token_failures: list[str] = field(default_factory=list)
    routing: list[RoutingDiff] = field(default_factory=list)

    @property
    def near_ties(self) -> list[str]:
        return [f"{r.key}: rows {list(r.near_tie_rows)}" for r in self.routing if r.near_tie_rows]

    def failures(self) -> list[str]:
        out = [f"{c.name}: {c.message()}" for c in self.comparisons if not c.passed]
        out += self.rel_l2_failures + self.token_failures
        out += [
            f"{r.key}: expert sets differ at rows {list(r.mismatched_rows[:10])} ({len(r.mismatched_rows)} of {r.rows})"
            for r in self.routing
            if not r.passed
        ]
        return out

    def passed_exactly(self) -> bool:
        """No failure and every numerical comparison exact (meaningful for exact comparisons)."""
        return not self.failures() and all(c.max_abs_err == 0 for c in self.comparisons)

    def assert_ok(self) -> None:
        problems = self.failures()
        if problems:
            raise AssertionError(f"{len(problems)} divergence(s):\n" + "\n".join(problems))


@dump_level  # the gate's report records the verdict per key (verifier/recording.py)
def compare_dumps(
    actual: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    *,
    logits_tol: Tolerance | None = None,
    max_rel_l2: float | None = None,
    near_tie: NearTie = NEAR_TIE,
) -> DumpDiff:
    """Compare every key of `expected` that a dump carries. Deciding values for the near-tie rule
    come from `expected` (see the module docstring); without them every routing difference is a
    failure."""
    missing = sorted(k for k in _dump_keys(expected) if k not in actual)
    if missing:
        raise KeyError(f"the dump lacks {len(missing)} key(s) the reference has, first {missing[0]}")
    diff = DumpDiff()
    for key in sorted(_dump_keys(expected)):
        _compare_key(diff, key, actual[key], expected, logits_tol, max_rel_l2, near_tie)
    return diff


def _dump_keys(data: dict[str, np.ndarray]) -> list[str]:
    prefixes = ("input_ids_p", "logits_p", "greedy_p", "greedy_logits_p", "topk_ids_p", "decode_topk_ids_p")
    return [k for k in data if k.startswith(prefixes)]


def _compare_key(
    diff: DumpDiff,
    key: str,
    actual: np.ndarray,
    expected: dict,
    logits_tol: Tolerance | None,
    max_rel_l2: float | None,
    near_tie: NearTie,
) -> None:
    want = expected[key]
    if ROUTING_KEY.match(key):
        diff.routing.append(routing_diff(key, actual, want, _margins(expected, key),
                                         expected.get(GROUPING_KEY), near_tie))
    elif key.startswith(("greedy_p", "input_ids_p")):
        _compare_tokens(diff, key, actual, want)
    else:
        _compare_logits(diff, key, actual, want, logits_tol, max_rel_l2)


def _compare_tokens(diff: DumpDiff, key: str, actual: np.ndarray, want: np.ndarray) -> None:
    if actual.shape != want.shape or not np.array_equal(actual, want):
        parted = _first_difference(actual, want)
        diff.token_failures.append(
            f"{key}: tokens part at step {parted}: "
            f"{actual[parted : parted + 3].tolist()} vs {want[parted : parted + 3].tolist()}"
        )


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    unequal = np.flatnonzero(a[:n] != b[:n])
    return int(unequal[0]) if unequal.size else n


def _compare_logits(
    diff: DumpDiff, key: str, actual: np.ndarray, want: np.ndarray, tol: Tolerance | None, max_rel_l2: float | None
) -> None:
    if tol is None and max_rel_l2 is None:
        tol = EXACT
    result = compare(actual, want, tol if tol is not None else EXACT, name=key)  # rel_l2 ignores tol
    if tol is not None:
        diff.comparisons.append(result)
    if max_rel_l2 is not None and not result.rel_l2 < max_rel_l2:
        diff.rel_l2_failures.append(
            f"{key}: relative L2 error {result.rel_l2:.3e} is not under {max_rel_l2:g} "
            f"(greatest absolute difference {result.max_abs_err:.3e} at index "
            f"{result.max_abs_index})"
        )


def _margins(expected: dict, key: str) -> np.ndarray | None:
    return expected.get(key.replace("topk_ids", "topk_margin"))


def routing_diff(
    key: str,
    actual: np.ndarray,
    want: np.ndarray,
    scores: np.ndarray | None,
    grouping: np.ndarray | None = None,
    near_tie: NearTie = NEAR_TIE,
) -> RoutingDiff:
    """Rows whose expert sets differ, split into failures and near-ties. `scores` [T, E] are the
    reference's deciding values (None: every difference fails); `grouping` is [n_group,
    topk_group] (None: no groups). A differing row is a near-tie only if `actual` holds every
    expert the values decide without a near-tie and none they reject."""
    if actual.shape != want.shape:
        return RoutingDiff(key, len(want), tuple(range(len(want))), ())
    differ = np.flatnonzero((np.sort(actual, -1) != np.sort(want, -1)).any(-1))
    if scores is None or not differ.size:
        return RoutingDiff(key, len(want), tuple(int(r) for r in differ), ())
    scores = _checked_scores(key, scores, want)
    n_group, topk_group = (1, 1) if grouping is None else (int(grouping[0]), int(grouping[1]))
    must, must_not = routing_bounds(scores[differ], want.shape[1], n_group, topk_group, near_tie)
    wrong = {int(differ[r]) for r, _, _ in routing_violations(actual[differ], must, must_not)}
    return RoutingDiff(key, len(want), tuple(sorted(wrong)), tuple(int(r) for r in differ if int(r) not in wrong))


def routing_violations(ids: np.ndarray, must: np.ndarray, must_not: np.ndarray) -> list[tuple[int, list, list]]:
    """(row, experts missing, experts wrongly chosen) for each row of `ids` [T, k] (in range) that
    lacks an expert of `must` [T, E] or holds one of `must_not` [T, E]."""
    chosen = np.zeros(must.shape, bool)
    np.put_along_axis(chosen, ids, True, axis=-1)
    missing, wrong = must & ~chosen, must_not & chosen
    return [(int(r), np.flatnonzero(missing[r]).tolist(), np.flatnonzero(wrong[r]).tolist())
            for r in np.flatnonzero((missing | wrong).any(axis=-1))]


def _checked_scores(key: str, scores: np.ndarray, want: np.ndarray) -> np.ndarray:
    """The deciding values as [T, E]; older dumps' per-token gaps are refused by name."""
    if scores.ndim != 2 or scores.shape[0] != want.shape[0] or scores.shape[1] < want.shape[1]:
        raise ValueError(f"{key}: the reference's deciding values have shape {scores.shape}, expected "
                         f"[{want.shape[0]}, experts]; a per-token margin (older goldens) cannot tell "
                         "which positions are tied: rebuild with fixtures/build_fixtures.py")
    return scores
