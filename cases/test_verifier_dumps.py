"""Known-answer tests for the routing near-tie rule (verifier.tolerance.NEAR_TIE, routing_bounds)
and the routing rule of verifier.dumps: only near-tied positions may differ."""

from __future__ import annotations

import numpy as np
import pytest

from verifier.dumps import GROUPING_KEY, compare_dumps, routing_diff
from verifier.tolerance import NEAR_TIE, NearTie, group_bounds, routing_bounds

KEY = "topk_ids_p0_layer1"


def test_near_tie_is_relative_to_the_deciding_values():
    first = np.array([1.0, 1.0, 1e3, 1e3, 5.0, 0.0, -np.inf])
    second = np.array([1.0 - 1e-5, 1.0 - 1e-3, 1e3 - 1e-3, 1e3 - 1.0, -np.inf, 0.0, -np.inf])
    assert NEAR_TIE.tied(first, second).tolist() == [True, False, True, False, False, True, True]
    assert NearTie(rtol=0.0, atol=0.0).tied(first, second).tolist() == [False] * 5 + [True, True]
    with pytest.raises(ValueError, match="atol"):
        NearTie(rtol=1e-5, atol=-1.0)


def test_bounds_on_wide_logits_compare_every_id():
    """The issue's row: experts 65, 100 and 300 nats down are decided, whatever their probability."""
    must, must_not = routing_bounds(np.array([[0.0, -65.0, -100.0, -300.0]]), top_k=2)
    assert must.tolist() == [[True, True, False, False]] and must_not.tolist() == [[False, False, True, True]]


def test_bounds_leave_only_the_tied_positions_open():
    scores = np.array([[3.0, 1.0, 1.0 + 1e-6, 0.5, 2.0]])  # the 3rd place: a near-tie of experts 1 and 2
    must, must_not = routing_bounds(scores, top_k=2)
    assert must.tolist() == [[True, False, False, False, True]]
    assert must_not.tolist() == [[False, True, True, True, False]]
    must, must_not = routing_bounds(scores, top_k=3)
    assert must.tolist() == [[True, False, False, False, True]]
    assert must_not.tolist() == [[False, False, False, True, False]]


def test_group_bounds_and_contested_groups():
    # groups of two: sums 1.7, 1.0, 0.5, 1.0 + 1e-6 -> group 0 kept, groups 1 and 3 contested, 2 dropped
    scores = np.array([[0.9, 0.8, 0.5, 0.5, 0.3, 0.2, 0.5, 0.5 + 1e-6]])
    kept, dropped = group_bounds(scores, n_group=4, topk_group=2)
    assert kept.tolist() == [[True, False, False, False]] and dropped.tolist() == [[False, False, True, False]]
    must, must_not = routing_bounds(scores, top_k=2, n_group=4, topk_group=2)
    assert must.tolist() == [[True, True] + [False] * 6]
    assert must_not.tolist() == [[False, False, False, False, True, True, False, False]]
    kept, dropped = group_bounds(scores, n_group=4, topk_group=4)
    assert kept.all() and not dropped.any()


def _dump_pair(actual_row, want_row=(0, 1, 2)):
    scores = np.array([[5.0, 4.0, 3.0, 3.0 + 1e-6, 1.0, 0.0]])  # experts 2 and 3 tie for the 3rd place
    actual = {KEY: np.array([actual_row])}
    expected = {KEY: np.array([want_row]), "topk_margin_p0_layer1": scores, GROUPING_KEY: np.array([1, 1])}
    return actual, expected


def test_dumps_excuse_only_the_tied_position():
    actual, expected = _dump_pair((0, 1, 3))
    diff = compare_dumps(actual, expected)
    assert diff.failures() == [] and diff.near_ties == [f"{KEY}: rows [0]"]


@pytest.mark.parametrize("actual_row", [(1, 2, 3), (0, 2, 3), (0, 1, 4)], ids=["top-dropped", "second-dropped", "outsider"])
def test_dumps_fail_a_wrong_expert_in_a_near_tied_row(actual_row):
    """A near-tie at the k-th expert does not excuse a wrong top expert or an outsider."""
    actual, expected = _dump_pair(actual_row)
    failures = compare_dumps(actual, expected).failures()
    assert len(failures) == 1 and failures[0].startswith(f"{KEY}: expert sets differ at rows [0] (1 of 1): row 0 ids")


def test_dumps_without_deciding_values_fail_every_difference():
    diff = routing_diff(KEY, np.array([[0, 1, 3]]), np.array([[0, 1, 2]]), None)
    assert diff.mismatched_rows == (0,) and diff.near_tie_rows == ()


def test_dumps_refuse_per_token_margins_by_key():
    actual, expected = _dump_pair((0, 1, 3))
    expected["topk_margin_p0_layer1"] = np.array([1e-6])
    with pytest.raises(ValueError, match=rf"^{KEY}: the reference's deciding values have shape \(1,\)"):
        compare_dumps(actual, expected)
