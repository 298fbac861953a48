"""A second detector for `router.mask_fill_zero`: drawn rows where every biased score is negative.

The router cases catch a masked group filled with 0 instead of -inf through one hand-picked input
compared with the float64 reference router (the ci profile rarely draws a negative bias, and the
fixtures' biases are positive). This property draws only the region where the fault matters:
correction biases below -1, so every selection score (sigmoid + bias) is negative and a masked
expert filled with 0 would outrank every kept one. It checks a structural invariant instead of a
reference's ids: every selected expert lies in one of the `topk_group` best groups, a group scored
by the sum of its two best selection scores (rows where the group ranking nearly ties at its
boundary prove nothing and are skipped).
"""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.moe import router

pytestmark = pytest.mark.gate_area("routing")  # the report area (verifier/report.py)

GROUP_TIE = 1e-5  # group scores are sums of two float32 values of magnitude < 5: ulps are ~5e-7
GROUPINGS = ((4, 2, 1), (4, 2, 2), (8, 4, 2), (8, 4, 3))  # (n_group, experts per group, topk_group)


def best_groups(selection: np.ndarray, n_group: int, topk_group: int) -> list[set[int] | None]:
    """Per row, the `topk_group` groups with the largest sum of their two best selection scores in
    float64; None where the groups just inside and just outside the cut are closer than float32's
    rounding of the router could separate (it ranks in float32)."""
    grouped = np.sort(selection.astype(np.float64).reshape(len(selection), n_group, -1), axis=-1)
    scores = grouped[..., -2:].sum(axis=-1)  # [T, G]
    order = np.argsort(-scores, axis=-1, kind="stable")
    rows = []
    for row, ranked in zip(scores, order):
        tie = topk_group < n_group and row[ranked[topk_group - 1]] - row[ranked[topk_group]] < GROUP_TIE
        rows.append(None if tie else set(ranked[:topk_group].tolist()))
    return rows


@given(grouping=st.sampled_from(GROUPINGS), rows=st.integers(1, 6), seed=st.integers(0, 2**16),
       low=st.floats(-4.0, -1.01))
def test_masked_groups_never_win_when_every_score_is_negative(faults, grouping, rows, seed, low):
    n_group, per_group, topk_group = grouping
    experts = n_group * per_group
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (rows, experts)).astype(np.float32)
    bias = rng.uniform(low, -1.0, experts).astype(np.float32)  # sigmoid < 1: every score negative
    top_k = min(per_group * topk_group, 2)
    ids, _ = router.noaux_tc(paddle.to_tensor(logits), paddle.to_tensor(bias), top_k=top_k, n_group=n_group,
                             topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=1.0, faults=faults)
    selection = 1 / (1 + np.exp(-logits.astype(np.float64))) + bias
    for row, (chosen, allowed) in enumerate(zip(ids.numpy(), best_groups(selection, n_group, topk_group))):
        groups = {int(e) // per_group for e in chosen}
        assert allowed is None or groups <= allowed, f"row {row}: experts {chosen.tolist()} in groups {groups}, " \
                                                     f"kept groups {sorted(allowed)}"
