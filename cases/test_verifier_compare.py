"""Known-answer tests for verifier.tolerance and verifier.compare, plus hypothesis properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from verifier.compare import Comparison, assert_close, assert_equal, compare, rel_l2
from verifier.tolerance import DEFAULT_TOLERANCES, EXACT, Tolerance, tolerance_for

F32 = DEFAULT_TOLERANCES["float32"]


def _logits(rows: int = 4, vocab: int = 16) -> np.ndarray:
    """Distinct float32 values per row, so argmax and top-k ids are unambiguous."""
    return np.random.default_rng(0).permutation(rows * vocab).reshape(rows, vocab).astype(np.float32)


# --- tolerance table ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, "float32", np.dtype("float32"), "paddle.float32"])
def test_tolerance_for_accepts_numpy_and_names(dtype: object) -> None:
    assert tolerance_for(dtype) == F32


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", np.uint8])
def test_discrete_dtypes_are_exact(dtype: object) -> None:
    assert tolerance_for(dtype) is EXACT and EXACT.exact


def test_override_needs_both() -> None:
    assert tolerance_for("bfloat16", rtol=0.5, atol=0.25) == Tolerance(0.5, 0.25)
    with pytest.raises(ValueError, match="atol is missing"):
        tolerance_for("float32", rtol=1e-3)
    with pytest.raises(ValueError, match="rtol is missing"):
        tolerance_for("float32", atol=1e-3)


def test_unknown_dtype_raises_naming_it() -> None:
    with pytest.raises(ValueError, match="complex64"):
        tolerance_for(np.complex64)


@pytest.mark.parametrize(("rtol", "atol", "field"), [(-1.0, 0.0, "rtol"), (0.0, float("nan"), "atol")])
def test_tolerance_rejects_negative_or_nan(rtol: float, atol: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Tolerance(rtol, atol)


# --- the row-scaled atol (verifier/tolerance.py ROW_UNIT): hand-worked answers -------------------


def test_table_atol_is_per_unit_of_the_expected_rows_rms() -> None:
    """Row 0 = [3, 4, 0, 0] has RMS sqrt(25 / 4) = 2.5: atol 2.5e-5 at its zero elements. Row 1 has
    RMS 0.25 < 1: atol stays 1e-5 (the floor). Scale per row of the last axis, not per array or
    column (column 2 is all zero: a column scale would allow only 1e-5 at (0, 2))."""
    expected = np.array([[3.0, 4.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    actual = expected.copy()
    actual[0, 2] = 2.4e-5  # 0.96 of its row's atol
    actual[1, 2] = 0.9e-5
    assert compare(actual, expected, F32).passed
    actual[0, 2] = 2.6e-5  # 1.04 of it
    assert compare(actual, expected, F32).first_mismatch_index == (0, 2)
    actual[0, 2], actual[1, 2] = 0.0, 1.1e-5  # 1.1x the floor, in the small row of a large array
    assert compare(actual, expected, F32).first_mismatch_index == (1, 2)  # whole array's RMS 1.78 would pass it


def test_row_scale_comes_from_expected_not_actual() -> None:
    expected = np.array([0.0, 0.0, 0.0, 0.0])
    actual = np.array([0.0, 1e-4, 40.0, 0.0])  # actual's row RMS 20 would allow 2e-4 at element 1
    assert compare(actual, expected, F32).first_mismatch_index == (1,)
    assert not compare(np.array([0.0, 1.1e-5]), np.array([0.0, 0.0]), F32).passed


def test_row_scale_skips_non_finite_expected_values() -> None:
    """An inf in the expected row would make its RMS (and so every bound in the row) infinite."""
    expected = np.array([np.inf, 0.0, 0.0, 0.0])
    actual = np.array([np.inf, 2e-5, 0.0, 0.0])
    assert compare(actual, expected, F32).first_mismatch_index == (1,)
    assert compare(np.array([np.inf, 0.9e-5, np.nan]), np.array([np.inf, 0.0, np.nan]), F32, equal_nan=True).passed
    huge = np.array([1e300, -1e300, 0.0, 0.0])  # squares overflow float64; RMS is 1e300 / sqrt(2)
    result = compare(huge + np.array([0.0, 0.0, 1e294, 0.0]), huge, F32)
    assert result.passed and math.isclose(result.max_abs_atol, 1e-5 * 1e300 / math.sqrt(2))
    assert not compare(huge + np.array([0.0, 0.0, 1e296, 0.0]), huge, F32).passed


def test_override_pairs_are_absolute_unless_they_name_a_unit() -> None:
    expected = np.array([3.0, 4.0, 0.0, 0.0])  # RMS 2.5
    actual = expected + np.array([0.0, 0.0, 2e-5, 0.0])
    assert compare(actual, expected, F32).passed
    assert not compare(actual, expected, tolerance_for("float32", rtol=1e-5, atol=1e-5)).passed
    assert compare(actual, expected, tolerance_for("float32", rtol=1e-5, atol=1e-5, unit=1.0)).passed
    assert not compare(actual, expected, Tolerance(1e-5, 1e-5, unit=2.0)).passed  # atol 1.25e-5
    with pytest.raises(ValueError, match="unit"):
        tolerance_for("float32", unit=2.0)
    for unit in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="unit"):
            Tolerance(1e-5, 1e-5, unit)


def test_the_rule_is_printed_as_it_is() -> None:
    assert str(F32) == "rtol=1e-05, atol=1e-05 x max(1, row RMS)"
    assert str(Tolerance(1e-5, 1e-5)) == "rtol=1e-05, atol=1e-05"
    assert str(Tolerance(1e-3, 2e-3, 4.0)) == "rtol=0.001, atol=0.002 x max(1, row RMS / 4)"
    assert str(Tolerance(0.0, 0.0, 1.0)) == "exact"
    result = compare(np.array([3.0, 4.0, 1e-4, 0.0]), np.array([3.0, 4.0, 0.0, 0.0]), F32)
    assert result.message().splitlines()[2] == (
        "Greatest absolute difference: 0.0001 at index (2,) (up to 2.5e-05 allowed: atol 1e-05 x row RMS 2.5)")
    small = compare(np.array([1.0, 1e-4]), np.array([1.0, 0.0]), F32)
    assert small.message().splitlines()[2].endswith("(up to 1e-05 allowed)")


# --- compare: known answers --------------------------------------------------------------------


def test_identical_arrays_pass_with_zero_everywhere() -> None:
    x = _logits()
    c = compare(x, x.copy(), name="logits")
    assert c.passed and c.mismatches == 0 and c.total == x.size
    assert (c.max_abs_err, c.max_rel_err, c.rel_l2, c.max_ulp) == (0.0, 0.0, 0.0, 0)
    assert (c.argmax_agreement, c.topk_agreement, c.first_mismatch_index) == (1.0, 1.0, None)
    assert c.tol == F32 and c.dtype == "float32" and c.shape == (4, 16)


def test_planted_error_is_reported_at_its_index() -> None:
    expected = np.full((3, 5), 2.0, dtype=np.float32)
    actual = expected.copy()
    actual[1, 3] = 2.5
    c = compare(actual, expected)
    assert not c.passed and c.mismatches == 1
    assert c.max_abs_err == 0.5 and c.max_abs_index == (1, 3)
    assert c.max_rel_err == 0.25 and c.max_rel_index == (1, 3)
    assert c.first_mismatch_index == (1, 3)
    assert c.rel_l2 == pytest.approx(0.5 / np.linalg.norm(expected))


def test_message_names_the_index_and_counts() -> None:
    expected = np.zeros((4, 1024), dtype=np.float32)
    actual = expected.copy()
    actual[3, 17] = 2e-3
    text = compare(actual, expected).message()
    assert "Mismatched elements: 1 / 4096 (0.0%)" in text
    assert "Greatest absolute difference: 0.002 at index (3, 17) (up to 1e-05 allowed)" in text
    assert "Greatest relative difference: inf at index (3, 17)" in text
    assert "First mismatch at index (3, 17)" in text


def test_assert_close_raises_with_name_and_message() -> None:
    expected = np.ones(8, dtype=np.float32)
    actual = expected.copy()
    actual[6] = 3.0
    with pytest.raises(AssertionError, match=r"(?s)^hidden: Not close .*at index \(6,\)"):
        assert_close(actual, expected, name="hidden")
    assert isinstance(assert_close(expected, expected.copy()), Comparison)


def test_within_tolerance_passes_and_beyond_fails() -> None:
    expected = np.ones(4, dtype=np.float64)
    inside, outside = expected + 0.5 * (F32.atol + F32.rtol), expected + 2 * (F32.atol + F32.rtol)
    assert compare(inside, expected, F32).passed
    assert not compare(outside, expected, F32).passed
    with pytest.raises(AssertionError):
        assert_equal(inside, expected)


# --- ULP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_ulp_of_nextafter_is_one(dtype: type) -> None:
    x = np.array([1.0, -3.5, 1e-3], dtype=dtype)
    assert compare(np.nextafter(x, dtype(np.inf)), x, tolerance_for(dtype, rtol=1.0, atol=1.0)).max_ulp == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ulp_across_zero(dtype: type) -> None:
    tiny = np.finfo(dtype).smallest_subnormal
    assert compare(np.array([-0.0], dtype), np.array([0.0], dtype)).max_ulp == 0
    c = compare(np.array([tiny], dtype), np.array([-tiny], dtype), tolerance_for(dtype, rtol=0.0, atol=1.0))
    assert c.max_ulp == 2 and c.passed


def test_ulp_is_none_for_ints_and_mixed_float_widths() -> None:
    assert compare(np.arange(3), np.arange(3)).max_ulp is None
    assert compare(np.ones(3, np.float32), np.ones(3, np.float64)).max_ulp is None


# --- NaN / Inf -----------------------------------------------------------------------------------


def test_nan_against_number_is_a_mismatch_reported_at_the_nan() -> None:
    expected = np.arange(4, dtype=np.float32)
    actual = expected.copy()
    actual[2] = np.nan
    c = compare(actual, expected)
    assert c.mismatches == 1 and c.first_mismatch_index == (2,)
    assert np.isnan(c.max_abs_err) and c.max_abs_index == (2,)
    assert (c.nan_count_actual, c.nan_count_expected) == (1, 0)


def test_nan_against_nan_passes_only_with_equal_nan() -> None:
    x = np.array([1.0, np.nan, 3.0], dtype=np.float32)
    assert not compare(x, x.copy()).passed
    c = compare(x, x.copy(), equal_nan=True)
    assert c.passed and c.max_abs_err == 0.0 and c.rel_l2 == 0.0 and c.max_ulp == 0


def test_inf_handling() -> None:
    expected = np.array([1.0, np.inf, -np.inf], dtype=np.float32)
    assert compare(expected, expected.copy()).passed
    actual = expected.copy()
    actual[1] = np.finfo(np.float32).max
    c = compare(actual, expected, tolerance_for(np.float32, rtol=1.0, atol=1.0))
    assert not c.passed and c.first_mismatch_index == (1,)
    assert c.max_abs_err == np.inf and c.max_rel_index == (1,)
    assert (c.inf_count_actual, c.inf_count_expected) == (1, 2)


# --- agreement ---------------------------------------------------------------------------------


def test_argmax_and_topk_agreement_on_a_constructed_case() -> None:
    expected = _logits(rows=4, vocab=16)
    actual = expected.copy()
    actual[0, np.argmax(actual[0])] = -1.0  # row 0: argmax moves, top-5 keeps 4 of 5 ids
    c = compare(actual, expected, topk=5)
    assert c.argmax_agreement == 0.75
    assert c.topk_agreement == pytest.approx((4 / 5 + 3) / 4)
    assert "argmax agreement: 75.0%, top-5 agreement: 95.0%" in c.message()


def test_agreement_shapes() -> None:
    assert compare(np.float32(1.0), np.float32(1.0)).argmax_agreement is None
    one_row = compare(np.arange(8.0), np.arange(8.0), topk=3)
    assert (one_row.argmax_agreement, one_row.topk_agreement) == (1.0, 1.0)
    assert compare(np.arange(4.0), np.arange(4.0), topk=5).topk_agreement is None


# --- plumbing errors, ints, bfloat16, artifacts --------------------------------------------------


def test_shape_mismatch_raises_naming_both_shapes() -> None:
    pattern = r"kv: shape mismatch: actual \(2, 3\) vs expected \(3, 2\).*plumbing"
    with pytest.raises(ValueError, match=pattern):
        compare(np.zeros((2, 3)), np.zeros((3, 2)), name="kv")


def test_int_against_float_raises() -> None:
    with pytest.raises(ValueError, match="int64 vs expected float32"):
        compare(np.zeros(3, np.int64), np.zeros(3, np.float32))


def test_unsupported_dtype_raises_naming_it() -> None:
    with pytest.raises(ValueError, match="complex64"):
        compare(np.zeros(3, np.complex64), np.zeros(3, np.complex64), EXACT)


def test_ints_compare_exactly() -> None:
    expected = np.array([[3, 7, -1], [0, 2, 5]], dtype=np.int64)
    actual = expected.copy()
    actual[1, 2] = 8
    c = compare(actual, expected)
    assert c.tol.exact and c.mismatches == 1 and c.max_abs_err == 3.0
    assert c.first_mismatch_index == (1, 2) == c.max_abs_index
    assert assert_equal(expected, expected.copy()).passed
    assert "Not equal (int64, shape (2, 3), exact)" in c.message()


class _Bf16Tensor:
    """Stands in for a Paddle bfloat16 tensor: `.numpy()` hands back the raw uint16 bits."""

    dtype = "paddle.bfloat16"

    def __init__(self, values: np.ndarray) -> None:
        self._bits = (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)

    def numpy(self) -> np.ndarray:
        return self._bits


def test_bfloat16_tensors_are_decoded_and_use_the_bfloat16_row() -> None:
    expected = _Bf16Tensor([1.0, 2.0, -0.5])
    c = compare(_Bf16Tensor([1.0078125, 2.0, -0.5]), expected)  # 1 + 2**-7: one bfloat16 ulp
    assert c.dtype == "bfloat16" and c.tol == DEFAULT_TOLERANCES["bfloat16"]
    assert c.passed and c.max_ulp == 1 and c.max_abs_err == 2**-7


def test_paddle_tensors_are_accepted() -> None:
    paddle = pytest.importorskip("paddle")
    values = [1.0, 2.0, -0.5]
    actual = paddle.to_tensor([1.0078125, 2.0, -0.5], dtype="bfloat16")  # 1 + 2**-7: one bfloat16 ulp
    bf16 = compare(actual, paddle.to_tensor(values, dtype="bfloat16"))
    assert bf16.dtype == "bfloat16" and bf16.max_ulp == 1 and bf16.passed
    assert compare(paddle.to_tensor(values, dtype="float32"), np.array(values, np.float32)).max_ulp == 0


def test_to_dict_is_strict_json() -> None:
    actual = np.array([[np.nan, 1.0], [np.inf, 0.0]], dtype=np.float32)
    data = json.loads(json.dumps(compare(actual, np.zeros((2, 2), np.float32)).to_dict(), allow_nan=False))
    assert data["passed"] is False and data["shape"] == [2, 2] and data["max_abs_index"] == [0, 0]
    assert data["max_abs_err"] == "nan" and data["tol"] == {"rtol": F32.rtol, "atol": F32.atol, "unit": 1.0}


def test_rel_l2_function() -> None:
    assert rel_l2(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_l2(np.array([3.0, 4.0]), np.zeros(2)) == np.inf
    assert rel_l2(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == 1.0
    with pytest.raises(ValueError, match=r"rel_l2: shape mismatch: actual \(3,\) vs expected \(1,\)"):
        rel_l2(np.zeros(3), np.zeros(1))


def test_rel_l2_nan_and_equal_infinities() -> None:
    """A NaN anywhere makes rel L2 NaN; equal infinities are no error (finite norm of expected)."""
    assert math.isnan(rel_l2(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])))
    assert rel_l2(np.array([np.inf, 1.0]), np.array([np.inf, 2.0])) == 0.5


# --- edges found by mutation testing (bench/mutation.md) ---------------------------------------


def test_topk_bounds_are_named() -> None:
    x = _logits()
    assert compare(x, x, topk=1).topk_agreement == 1.0
    assert compare(x, x, topk=16).topk_agreement == 1.0  # the last axis exactly k long
    with pytest.raises(ValueError, match=r"^topk must be >= 1, got 0$"):
        compare(x, x, topk=0)


def test_topk_agreement_counts_the_largest_values() -> None:
    actual = np.arange(8, dtype=np.float32)
    expected = np.array([5, 0, 1, 2, 3, 4, 6, 7], np.float32)  # same top-2, different bottom-2
    assert compare(actual, expected, EXACT, topk=2).topk_agreement == 1.0
    assert compare(actual, actual[::-1].copy(), EXACT, topk=2).topk_agreement == 0.0
    assert compare(np.ones(1), np.ones(1)).argmax_agreement == 1.0


def test_equal_nan_pairs_only_nans_and_keeps_equal_values() -> None:
    both = np.array([np.nan, 1.0, np.inf])
    assert compare(both, both.copy(), EXACT, equal_nan=True).passed
    assert compare(np.array([np.nan, 1.0]), np.array([1.0, 1.0]), EXACT, equal_nan=True).mismatches == 1


def test_bound_is_inclusive_and_infinite_errors_stay_infinite() -> None:
    assert compare(np.array([1.5]), np.array([1.0]), Tolerance(0.25, 0.25)).passed  # |d| == bound
    assert compare(np.array([np.inf]), np.array([1.0])).max_rel_err == math.inf
    assert compare(np.array([np.nan, 1.0]), np.array([0.0, 1.0])).max_ulp == 0  # NaN positions skipped


def test_empty_arrays_compare_to_zero_error() -> None:
    c = compare(np.zeros((0, 3)), np.zeros((0, 3)))
    assert c.passed and c.max_abs_err == 0.0 and c.max_abs_index is None and c.argmax_agreement is None
    assert c.message().splitlines()[1] == "Mismatched elements: 0 / 0 (0.0%)"


def test_message_lines() -> None:
    c = compare(np.array([1.0, np.nan], np.float32), np.array([1.0, 2.0], np.float32), name="x")
    lines = c.message().split("\n")
    assert lines[0] == "Not close (float32, shape (2,), rtol=1e-05, atol=1e-05 x max(1, row RMS))"
    assert lines[1] == "Mismatched elements: 1 / 2 (50.0%)"
    assert lines[4] == "rel L2: nan, max ULP: 0"
    assert lines[5] == "NaN: actual 1, expected 0; Inf: actual 0, expected 0"
    assert compare(np.zeros(2, np.int64), np.zeros(2, np.int64)).message().splitlines()[4] == "rel L2: 0"
    passed = compare(np.ones((1, 3)), np.ones((1, 3)))
    assert passed.message().splitlines()[0] == "Close (float64, shape (1, 3), rtol=1e-12, atol=1e-12 x max(1, row RMS))"
    assert passed.message().splitlines()[-1] == "argmax agreement: 100.0%"  # last axis < topk: no top-k text
    assert passed.to_dict()["name"] == ""
    with pytest.raises(ValueError, match=r"^shape mismatch: .* not a numerical difference$"):
        compare(np.zeros(3), np.zeros(1))
    assert compare(np.ones(1), np.zeros(1), topk=1).topk_agreement == 1.0  # one element, k = 1


def test_assert_helpers_pass_their_arguments() -> None:
    one_ulp = np.nextafter(np.float32(1.0), np.float32(2.0))
    with pytest.raises(AssertionError, match=r"^ids: Not equal"):
        assert_equal(np.array([one_ulp]), np.array([1.0], np.float32), name="ids")
    with pytest.raises(AssertionError, match=r"^w: Not close"):
        assert_close(np.array([1.1]), np.array([1.0]), Tolerance(0.01, 0.01), name="w")
    assert assert_close(np.array([np.nan]), np.array([np.nan]), equal_nan=True).passed
    with pytest.raises(AssertionError):
        assert_close(np.array([np.nan]), np.array([np.nan]))


# --- properties --------------------------------------------------------------------------------

_FINITE = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
_ARRAYS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=_FINITE)


@given(_ARRAYS)
def test_self_comparison_always_passes_with_zero_error(x: np.ndarray) -> None:
    c = compare(x, x.copy())
    assert c.passed and c.max_abs_err == 0.0 and c.rel_l2 == 0.0 and c.max_ulp == 0


@given(_ARRAYS, st.data())
def test_one_perturbation_beyond_tolerance_fails_and_is_named(x: np.ndarray, data: st.DataObject) -> None:
    index = tuple(data.draw(st.integers(0, side - 1)) for side in x.shape)
    actual = x.copy()
    row = x[index[:-1]].astype(np.float64)  # the float32 row's atol is per unit of this row's RMS, at least 1
    row_atol = F32.atol * max(1.0, math.sqrt(float(np.mean(row * row))))
    actual[index] += np.float32(10 * (row_atol + F32.rtol * abs(float(x[index]))))
    c = compare(actual, x)
    assert c.mismatches == 1 and c.first_mismatch_index == index == c.max_abs_index


@given(st.floats(-(2.0**100), 2.0**100, width=32), st.integers(0, 40))
def test_ulp_counts_nextafter_steps(start: float, steps: int) -> None:
    x = np.array([start], np.float32)
    y = x.copy()
    for _ in range(steps):
        y = np.nextafter(y, np.float32(np.inf))
    assert compare(y, x, tolerance_for(np.float32, rtol=1.0, atol=1.0)).max_ulp == steps
