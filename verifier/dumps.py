"""Dump against dump: one run's outputs (engine/dump.py keys) checked against another's or a golden.

Three kinds of output, three rules:
  logits         numerical: element-wise within a Tolerance, and/or relative L2 under a bound
  greedy tokens  exact; the report names the first step where they part
  routed experts exact per token, except rows the reference marks as near-ties (a decision
                 margin below `near_tie`): those are reported separately, never hidden and
                 never failed, since float32 rounding may legitimately flip them
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from verifier.compare import Comparison, compare
from verifier.recording import dump_level
from verifier.tolerance import EXACT, Tolerance

ROUTING_KEY = re.compile(r"^(decode_)?topk_ids_p(\d+)_layer(\d+)$")
NEAR_TIE_MARGIN = 1e-4  # below this decision margin a float32 rounding may flip an expert choice


@dataclass(frozen=True)
class RoutingDiff:
    key: str
    rows: int
    mismatched_rows: tuple[int, ...]  # rows whose expert sets differ and were decisive
    near_tie_rows: tuple[int, ...]  # rows whose sets differ within the near-tie margin

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
    near_tie: float = NEAR_TIE_MARGIN,
) -> DumpDiff:
    """Compare every key of `expected` that a dump carries. Margins for the near-tie rule come
    from `expected` (`topk_margin_p{i}_layer{L}` keys, as the goldens carry); without them every
    routing difference is a failure."""
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
    near_tie: float,
) -> None:
    want = expected[key]
    if ROUTING_KEY.match(key):
        diff.routing.append(routing_diff(key, actual, want, _margins(expected, key), near_tie))
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
    key: str, actual: np.ndarray, want: np.ndarray, margins: np.ndarray | None, near_tie: float = NEAR_TIE_MARGIN
) -> RoutingDiff:
    """Rows whose expert sets differ, split into decisive mismatches and near-ties."""
    if actual.shape != want.shape:
        return RoutingDiff(key, len(want), tuple(range(len(want))), ())
    differ = np.flatnonzero((np.sort(actual, -1) != np.sort(want, -1)).any(-1))
    tied = set() if margins is None else {int(r) for r in differ if margins[r] < near_tie}
    return RoutingDiff(key, len(want), tuple(int(r) for r in differ if int(r) not in tied), tuple(sorted(tied)))
