"""Dump against dump: one run's outputs (engine/dump.py keys) checked against another's or a golden.

Three kinds of output, three rules:
  logits         numerical: element-wise within a Tolerance, and/or relative L2 under a bound
  greedy tokens  exact; the report names the first step where they part
  routed experts every row of both dumps holds k distinct ids in [0, E) (a -1, a repeat or an id
                 out of range fails the row by name; dumps mark no row as padding); a row whose
                 set differs from the reference's is a near-tie when some resolution of the
                 near-ties under `verifier.tolerance.NEAR_TIE` chooses it (verifier/routing.py:
                 group cut first, then the k-th expert): reported separately, never hidden, never
                 failed; any other differing row fails.

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
from verifier.routing import RowFailure, malformed, routing_failures
from verifier.tolerance import EXACT, NEAR_TIE, NearTie, Tolerance

ROUTING_KEY = re.compile(r"^(decode_)?topk_ids_p(\d+)_layer(\d+)$")
GROUPING_KEY = "topk_margin_grouping"


@dataclass(frozen=True)
class RoutingDiff:
    key: str
    rows: int
    mismatched_rows: tuple[int, ...]  # malformed rows and rows no resolution of the near-ties admits
    near_tie_rows: tuple[int, ...]  # rows that differ from the reference, admissible under a near-tie
    problems: tuple[str, ...] = ()  # one line per mismatched row: row, ids, why

    @property
    def passed(self) -> bool:
        return not self.mismatched_rows

    def message(self) -> str:
        """One line: the failed rows, then the first few named with their ids and the reason."""
        named = "; ".join(self.problems[:3]) + (" ..." if len(self.problems) > 3 else "")
        return (f"expert sets differ at rows {list(self.mismatched_rows[:10])} "
                f"({len(self.mismatched_rows)} of {self.rows})" + (f": {named}" if named else ""))


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
        out += [f"{r.key}: {r.message()}" for r in self.routing if not r.passed]
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


def with_margins(dump: dict[str, np.ndarray], source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`dump` with the routing deciding values (`*topk_margin*` keys) of `source`, a reference run of
    the same prompts (the goldens), each cut to the rows its routing key has in `dump`: a reference
    that generated more tokens carries more decode rows, and its first rows decide the same steps
    (the greedy tokens, compared exactly, say whether the contexts still agree). A margin key whose
    routing key `dump` lacks is kept whole."""
    out = dict(dump)
    for key, values in source.items():
        if "margin" not in key:
            continue
        ids = dump.get(key.replace("topk_margin", "topk_ids"))
        rows = len(ids) if ids is not None and values.ndim == 2 and len(values) >= len(ids) else None
        out[key] = values if rows is None else values[:rows]
    return out


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
    """Routing rows of `actual` against the reference `want` [T, k] (every row real: dumps mark
    none as padding). A row of either side that is not k distinct ids in [0, E) fails, named. A
    well-formed row whose expert set differs from the reference's is a near-tie when it is
    admissible under `near_tie` on the reference's deciding values `scores` [T, E] (grouping:
    [n_group, topk_group], None for no groups; verifier/routing.py), and fails otherwise; without
    `scores` every difference fails."""
    if actual.shape != want.shape or actual.ndim != 2:
        return RoutingDiff(key, len(want), tuple(range(len(want))), (),
                           (f"shape {actual.shape} vs the reference's {want.shape}",))
    if scores is not None:
        scores = _checked_scores(key, scores, want)
    n_group, topk_group = (1, 1) if grouping is None else (int(grouping[0]), int(grouping[1]))
    experts = None if scores is None else scores.shape[1]
    bad = {f.row: f"{f} (reference)" for f in _malformed_rows(want, experts)}
    bad |= {f.row: str(f) for f in _malformed_rows(actual, experts)}
    differ = [r for r in np.flatnonzero((np.sort(actual, -1) != np.sort(want, -1)).any(-1)) if r not in bad]
    if scores is None:
        bad |= {int(r): f"row {r} ids {actual[r].tolist()}: reference {want[r].tolist()}, no deciding values" for r in differ}
    else:
        rows = np.asarray(differ, np.int64)
        for failure in routing_failures(actual[rows], scores[rows], n_group, topk_group, near_tie):
            row = int(rows[failure.row])
            bad[row] = f"row {row} ids {list(failure.ids)}: {failure.reason} (reference {want[row].tolist()})"
    near = tuple(int(r) for r in differ if int(r) not in bad)
    return RoutingDiff(key, len(want), tuple(sorted(bad)), near, tuple(bad[r] for r in sorted(bad)))


def _malformed_rows(ids: np.ndarray, experts: int | None) -> list[RowFailure]:
    """Rows that are not k distinct ids in [0, experts) (experts None: only >= 0 and distinct)."""
    return [RowFailure(r, tuple(int(i) for i in ids[r]), reason) for r in range(len(ids))
            if (reason := malformed(tuple(int(i) for i in ids[r]), experts)) is not None]


def routing_violations(ids: np.ndarray, scores: np.ndarray, n_group: int = 1, topk_group: int = 1,
                       near_tie: NearTie = NEAR_TIE) -> list[RowFailure]:
    """Every row of `ids` [T, k] (all real rows) that is malformed or not admissible on the
    deciding values `scores` [T, E] (verifier/routing.py); empty when every row is a correct routing."""
    return routing_failures(ids, scores, n_group, topk_group, near_tie)


def _checked_scores(key: str, scores: np.ndarray, want: np.ndarray) -> np.ndarray:
    """The deciding values as [T, E]; older dumps' per-token gaps are refused by name."""
    if scores.ndim != 2 or scores.shape[0] != want.shape[0] or scores.shape[1] < want.shape[1]:
        raise ValueError(f"{key}: the reference's deciding values have shape {scores.shape}, expected "
                         f"[{want.shape[0]}, experts]; a per-token margin (older goldens) cannot tell "
                         "which positions are tied: rebuild with fixtures/build_fixtures.py")
    return scores
