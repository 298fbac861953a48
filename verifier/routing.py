"""Routing verdicts: is a row of expert ids one of the routings its deciding values admit?

A row is judged in two steps, in this order:

1. Well-formed: k distinct ids, each in [0, E). A -1, a repeated id or an id outside the range is
   a row failure, whatever the near-tie rule would say. Padding rows (the engine's padded graph
   rows hold -1) are not rows to judge: a caller that knows which rows are padding passes only the
   real ones; a dump marks no row as padding, so a -1 in a dump is always a failure.
2. Admissible: some resolution of the near-ties (`verifier.tolerance.NEAR_TIE`) among the deciding
   values makes the row the router's choice. The group cut comes first (noaux_tc): a set K of
   `topk_group` groups is admissible when no group left out decisively beats a kept one, a group
   scoring the sum of its top-2 deciding values. The row is then admissible within K when all its
   experts lie in K and no expert of K left out decisively beats a chosen one. "Decisively beats"
   is `NearTie.beats`: greater and not near-tied. softmax_topk is the case of one group.

So a near-tie excuses exactly the swaps it allows: a tie between two groups lets either group in,
but not the kept group's second-best expert in place of its best.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from verifier.tolerance import NEAR_TIE, NearTie


@dataclass(frozen=True)
class RowFailure:
    """One routing row that is no correct routing: its index, its ids as given, and why."""

    row: int
    ids: tuple[int, ...]
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} ids {list(self.ids)}: {self.reason}"


def routing_failures(ids, scores=None, n_group: int = 1, topk_group: int = 1,
                     rule: NearTie = NEAR_TIE) -> list[RowFailure]:
    """The rows of `ids` [T, k] that are malformed or, given the deciding values `scores` [T, E]
    (float64 best), not admissible under `rule`; every row is a real row. Without `scores` only
    the form is checked, and the upper end of the range is unknown (ids must still be >= 0).

    Raises ValueError for `scores` of the wrong shape or a grouping that does not divide E.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"routing ids must be [tokens, k], got shape {ids.shape}")
    experts = None if scores is None else _checked_scores(scores, ids, n_group, topk_group).shape[1]
    failures = []
    for row in range(ids.shape[0]):
        chosen = tuple(int(i) for i in ids[row])
        reason = malformed(chosen, experts)
        if reason is None and scores is not None:
            reason = inadmissible(np.asarray(scores[row], np.float64), chosen, n_group, topk_group, rule)
        if reason is not None:
            failures.append(RowFailure(row, chosen, reason))
    return failures


def malformed(chosen: tuple[int, ...], experts: int | None) -> str | None:
    """Why a row of ids is not k distinct ids in [0, experts), or None when it is."""
    out = [i for i in chosen if i < 0 or (experts is not None and i >= experts)]
    if out:
        bound = "" if experts is None else f", {experts}"
        return f"id {out[0]} outside [0{bound})"
    repeated = sorted({i for i in chosen if chosen.count(i) > 1})
    return f"expert {repeated[0]} chosen twice" if repeated else None


def inadmissible(values: np.ndarray, chosen: tuple[int, ...], n_group: int, topk_group: int,
                 rule: NearTie = NEAR_TIE) -> str | None:
    """Why the well-formed row `chosen` is no routing that `values` [E] admit (module docstring),
    or None when some resolution of the near-ties chooses it."""
    size = len(values) // n_group
    own = sorted({e // size for e in chosen})
    if len(own) > topk_group:
        return f"experts from {len(own)} groups, only {topk_group} kept"
    intruder = _intruder(values, chosen, _experts(own, size), rule)
    if intruder is not None:
        return intruder
    free = [g for g in range(n_group) if g not in own and _intruder(values, chosen, _experts([g], size), rule) is None]
    group_scores = _group_scores(values, n_group)
    for extra in combinations(free, topk_group - len(own)):
        if _cut_admissible(group_scores, set(own) | set(extra), rule):
            return None
    return (f"no admissible cut of {topk_group} groups (scores {np.round(group_scores, 6).tolist()}) keeps "
            f"groups {own} without a group whose experts decisively beat a chosen one")


def _experts(groups, size: int) -> list[int]:
    return [g * size + j for g in groups for j in range(size)]


def _intruder(values: np.ndarray, chosen: tuple[int, ...], pool: list[int], rule: NearTie) -> str | None:
    """The first expert of `pool` left out that decisively beats a chosen one, described, or None."""
    left_out = [y for y in pool if y not in chosen]
    hits = np.argwhere(rule.beats(values[left_out][:, None], values[list(chosen)][None, :]))  # [n, 2]
    if not len(hits):
        return None
    y, x = left_out[hits[0][0]], chosen[hits[0][1]]
    return f"expert {y} ({values[y]:.9g}) left out decisively beats chosen expert {x} ({values[x]:.9g})"


def _group_scores(values: np.ndarray, n_group: int) -> np.ndarray:
    """[G] noaux_tc's group scores: the sum of each group's top-2 deciding values."""
    grouped = np.sort(values.reshape(n_group, -1), axis=-1)
    return grouped[:, -2:].sum(axis=-1)


def _cut_admissible(group_scores: np.ndarray, kept: set[int], rule: NearTie) -> bool:
    """No group left out decisively beats a kept one."""
    return not any(rule.beats(group_scores[b], group_scores[a])
                   for a in kept for b in range(len(group_scores)) if b not in kept)


def _checked_scores(scores, ids: np.ndarray, n_group: int, topk_group: int) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != ids.shape[0]:
        raise ValueError(f"deciding values have shape {scores.shape}, expected [{ids.shape[0]}, experts]")
    if n_group < 1 or scores.shape[1] % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"grouping n_group={n_group}, topk_group={topk_group} does not fit {scores.shape[1]} experts")
    return scores
