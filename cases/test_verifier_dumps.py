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


# ---------------------------------------------------------------------------- malformed rows


@pytest.mark.parametrize(("actual_row", "named"), [
    ((0, 1, -1), "id -1 outside [0, 6)"),  # -1 would index expert 5, the reference's 3rd choice
    ((0, 0, 1), "expert 0 chosen twice"),  # the 3rd place is near-tied: not an excuse for a repeat
    ((0, 1, 6), "id 6 outside [0, 6)"),
    ((0, 1, 99), "id 99 outside [0, 6)"),
])
def test_malformed_rows_fail_by_name_before_any_near_tie(actual_row, named):
    """A -1, a repeated or an out-of-range id is a named row failure (key, row, ids), never an
    excuse under a near-tie and never an exception, even where the reference's own choice is the
    expert -1 would wrap to."""
    scores = np.array([[5.0, 4.0, 3.0, 3.0 + 1e-6, 1.0, 3.0 - 1e-6]])  # experts 2, 3, 5 tie for the 3rd
    actual, expected = {KEY: np.array([actual_row])}, {KEY: np.array([[0, 1, 5]]), "topk_margin_p0_layer1": scores}
    [failure] = compare_dumps(actual, expected).failures()
    assert failure.startswith(f"{KEY}: expert sets differ at rows [0] (1 of 1): row 0 ids {list(actual_row)}: ")
    assert named in failure


def test_a_malformed_row_fails_even_without_deciding_values_and_in_the_reference():
    diff = routing_diff(KEY, np.array([[0, 0], [-1, 2]]), np.array([[0, 0], [1, 2]]), None)
    assert diff.mismatched_rows == (0, 1) and diff.near_tie_rows == ()
    assert "(reference)" not in diff.problems[0] and "chosen twice" in diff.problems[0]
    assert "row 1 ids [-1, 2]" in diff.problems[1]


def test_a_group_cut_tie_excuses_the_tied_group_best_expert_only():
    """Groups [3, 2], [3, 2] tie for the second kept place beside [10, 0]: a row from either tied
    group is admissible with that group's best expert, never with its second best (1.0 below)."""
    scores = np.array([[3.0, 2.0, 3.0, 2.0, 10.0, 0.0]])
    grouping = np.array([3, 2])
    assert routing_diff(KEY, np.array([[2, 4]]), np.array([[0, 4]]), scores, grouping).near_tie_rows == (0,)
    for wrong in ([1, 4], [3, 4], [0, 2]):
        assert routing_diff(KEY, np.array([wrong]), np.array([[0, 4]]), scores, grouping).mismatched_rows == (0,)


# ---------------------------------------------------------------------------- the bound, pinned


# The rule as documented (README "Routing: one near-tie rule"): within twice the float32 row,
# atol + rtol * max(|first|, |second|) with rtol = atol = 2e-5. Restated, not read from the code.
def _bound(value: float) -> float:
    return 2e-5 + 2e-5 * abs(value)


@pytest.mark.parametrize("regime", ["rtol", "atol"])
@pytest.mark.parametrize("decision", ["kth_expert", "group_cut"])
def test_the_near_tie_bound_is_pinned_from_both_sides(regime, decision):
    """Class guarded: the near-tie bound itself. A gap of 0.9 bound is excused, a gap of 1.1 bound
    fails, in the rtol regime (values ~1e3, where rtol decides) and the atol regime (values ~0),
    at the k-th expert and at the group cut. A rule 10x wider excuses the 1.1 gap, one 10x narrower
    fails the 0.9 gap, whether the change sits in NEAR_TIE, NearTie.tied or the routing verdict."""
    top = 1e3 if regime == "rtol" else 0.0
    for factor, excused in ((0.9, True), (1.1, False)):
        gap = factor * _bound(top)
        if decision == "kth_expert":  # expert 1 trails expert 0 by `gap` for the only place
            scores, grouping, want, got = [top, top - gap, top - 5.0], None, [0], [1]
        else:  # group 1's top-2 sum (top - gap) trails group 0's (top); one group kept, its best chosen
            half = top / 2
            scores, grouping, want, got = [half + 1, half - 1, half + 1 - gap, half - 1], np.array([2, 1]), [0], [2]
        diff = routing_diff(KEY, np.array([got]), np.array([want]), np.array([scores]), grouping)
        assert diff.passed == excused, (factor, diff)
        assert diff.near_tie_rows == ((0,) if excused else ())
        assert NEAR_TIE.tied(top, top - gap) == excused


# ---------------------------------------------------------------------------- the compare CLI


def _cli_dump(**changes) -> dict[str, np.ndarray]:
    """A one-prompt dump in engine/dump.py's format (every kind of key); `changes` replace or add."""
    rng = np.random.default_rng(5)
    arrays = {"names": np.asarray(["a"]), "input_ids_p0": rng.integers(0, 32, 4),
              "logits_p0": rng.standard_normal((4, 32)).astype(np.float32), "greedy_p0": rng.integers(0, 32, 3),
              "greedy_logits_p0": rng.standard_normal((3, 32)).astype(np.float32),
              KEY: np.array([[0, 1]] * 4), "decode_topk_ids_p0_layer1": np.array([[2, 3]] * 2)}
    return arrays | changes


def _cli(tmp_path, actual: dict, expected: dict, capsys) -> tuple[int, str, str]:
    from verifier.__main__ import main

    np.savez(tmp_path / "a.npz", **actual)
    np.savez(tmp_path / "b.npz", **expected)
    code = main(["compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    out = capsys.readouterr()
    return code, out.out, out.err


EXTRA_KEYS = ["input_ids_p1", "logits_p1", "greedy_p1", "greedy_logits_p1", "topk_ids_p0_layer2",
              "decode_topk_ids_p0_layer2", "topk_ids_p1_layer1"]


@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("extra", EXTRA_KEYS)
def test_compare_cli_names_keys_either_dump_lacks(tmp_path, capsys, side, extra):
    """Class guarded: the compare CLI's key check, in both directions and for every kind of dump
    key. A dump holding a key the other lacks (the run under test writing a prompt or a layer the
    reference has not, or the reference one the run lacks) is "different keys": exit 2, one
    `error:` line naming the key (README, the verifier CLI), never a pass on the shared keys."""
    like = {"logits": "logits_p0", "greedy_logits": "greedy_logits_p0", "greedy": "greedy_p0",
            "input_ids": "input_ids_p0", "decode_topk": "decode_topk_ids_p0_layer1", "topk": KEY}
    value = next(_cli_dump()[key] for prefix, key in like.items() if extra.startswith(prefix))
    actual, expected = (_cli_dump(**{extra: value}), _cli_dump()) if side == "A" else (_cli_dump(), _cli_dump(**{extra: value}))
    code, out, err = _cli(tmp_path, actual, expected, capsys)
    assert (code, out) == (2, "") and err.count("\n") == 1 and err.startswith("error: ")
    assert "different keys" in err and extra in err


@pytest.mark.parametrize("row", [[-1, 1], [0, 0], [0, 8]], ids=["minus-one", "repeat", "out-of-range"])
def test_compare_cli_fails_a_malformed_row_by_name(tmp_path, capsys, row):
    """A malformed routing row is exit 1 with the key, the row and its ids in the report, not a
    traceback, even when the reference marks every position of the row near-tied (all 8 tie)."""
    ids = _cli_dump()[KEY].copy()
    ids[2] = row
    margins = np.zeros((4, 8))
    code, out, err = _cli(tmp_path, _cli_dump(**{KEY: ids}), _cli_dump(topk_margin_p0_layer1=margins), capsys)
    assert code == 1 and err == "" and KEY in out and f"row 2 ids {row}" in out
