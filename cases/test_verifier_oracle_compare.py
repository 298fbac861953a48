"""`verifier.compare.compare` verified against a float64 restatement of its documented rule.

The oracle, written here from the contract and never calling the code under test:
  - floating point (float16/32/64, either side, widened to float64 exactly): element i is close
    when a == e (equal infinities, +0 and -0), or both are NaN and equal_nan was asked, or both are
    finite and |a - e| <= atol * max(1, s / unit) + rtol * |e|, where s is the root mean square of
    the finite values of e's row along the last axis (a 0-d array is one row; 0 when a row has no
    finite value) and unit is inf (absolute atol) or the table's row unit;
  - integer and bool data: close only when equal as integers, whatever the tolerance (an id off
    by one is wrong however large the ids), and the greatest difference is the exact integer one.
Every draw checks the verdict (against the table's float rows too, whatever their unit), the mismatch count, the first mismatching index, the NaN / Inf
counts and, for integers, the tolerance reported (exact) and the greatest absolute difference.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from verifier.compare import compare
from verifier.tolerance import Tolerance

# ci (25 examples) -> 100 draws, nightly (2,000) -> 10,000 (other profiles: 5 x theirs, at least 500).
# 100 in ci: of ten faults planted in verifier/compare.py and the tolerance's bounds (session 10),
# 500 draws caught every one and 100 all but an integer difference taken in float64, which the
# explicit 2**53 + 1 example below now catches at any count.
DRAWS = 100 if settings.default.max_examples <= 25 else max(500, 5 * settings.default.max_examples)
FLOATS = ("float16", "float32", "float64")
INTS = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
INF = math.inf
# (rtol, atol, unit): absolute pairs, and pairs whose atol is per unit of the row's RMS.
TOLERANCES = ((0.0, 0.0, INF), (1e-5, 1e-5, INF), (1.3e-6, 1e-5, INF), (1e-3, 0.0, INF), (0.0, 1e-3, INF),
              (0.5, 0.25, INF), (2.0, 3.0, INF), (1e-5, 1e-5, 1.0), (0.0, 1e-3, 1.0), (1e-3, 1e-3, 4.0),
              (0.0, 0.25, 0.5), (0.0, 0.0, 1.0))


# ---------------------------------------------------------------------------- the oracle


def oracle_row_atols(e: list, row_length: int, atol: float, unit: float) -> list[float]:
    """The atol in force at each element of the flat expected list `e`, whose rows (last axis)
    are `row_length` long: atol x max(1, RMS of the row's finite values / unit)."""
    out = []
    for start in range(0, len(e), max(row_length, 1)):
        row = [float(v) for v in e[start : start + row_length]]
        finite = [v for v in row if math.isfinite(v)]
        # sqrt(sum(v^2) / n) as hypot(v / sqrt(n), ...): never above max |v|, so it cannot overflow
        # (hypot of the values themselves is inf for two values near the float64 maximum)
        rms = math.hypot(*(v / math.sqrt(len(finite)) for v in finite)) if finite else 0.0
        out += [atol * max(1.0, rms / unit)] * len(row)
    return out


def oracle_close(a: list, e: list, rtol: float, atol: float, equal_nan: bool, floating: bool,
                 unit: float = INF, row_length: int = 1) -> list[bool]:
    if not floating:
        return [int(x) == int(y) for x, y in zip(a, e)]
    out = []
    for x, y, row_atol in zip(a, e, oracle_row_atols(e, row_length, atol, unit)):
        x, y = float(x), float(y)
        both_nan = math.isnan(x) and math.isnan(y)
        finite = math.isfinite(x) and math.isfinite(y)
        out.append(x == y or (equal_nan and both_nan) or (finite and abs(x - y) <= row_atol + rtol * abs(y)))
    return out


# ---------------------------------------------------------------------------- strategies


def _special(dtype: str):
    if dtype in FLOATS:
        info = np.finfo(dtype)
        return st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, float(info.max), float(info.tiny), 1.0])
    if dtype == "bool":
        return st.booleans()
    info = np.iinfo(dtype)
    return st.sampled_from([v for v in (int(info.min), int(info.max), 0, 1, 2**53, 2**53 + 1, 100000, 100001)
                            if info.min <= v <= info.max])


def _clamped(dtype: str, value: int) -> int:
    info = np.iinfo(dtype)
    return min(max(int(value), int(info.min)), int(info.max))


def _element(dtype: str):
    if dtype == "bool":
        return st.booleans()
    if dtype in FLOATS:
        return st.one_of(_special(dtype), st.floats(-1e4, 1e4), st.floats(-1e-3, 1e-3),
                         st.floats(width=int(dtype[-2:]) if dtype != "float16" else 16))
    info = np.iinfo(dtype)
    return st.one_of(_special(dtype), st.integers(int(info.min), int(info.max)),
                     st.integers(-3, 3).map(lambda v: _clamped(dtype, v)))


@st.composite
def pairs(draw):
    """(actual, expected, rtol, atol, equal_nan): the expected array, and an actual whose elements
    sit on, just inside or just outside the tolerance, or anywhere."""
    floating = draw(st.booleans())
    kinds = FLOATS if floating else INTS
    e_dtype, a_dtype = draw(st.sampled_from(kinds)), draw(st.sampled_from(kinds))
    shape = draw(st.sampled_from([(), (0,), (1,), (4,), (2, 3), (2, 1, 2), (3, 0), (3, 6)]))
    count = int(np.prod(shape))
    rtol, atol, unit = draw(st.sampled_from(TOLERANCES))
    expected = [draw(_element(e_dtype)) for _ in range(count)]
    with np.errstate(over="ignore", invalid="ignore"):  # as stored: the rows' RMS is of e_dtype's values
        stored = np.array(expected, dtype=np.float64 if floating else object).astype(e_dtype).tolist()
    row_atols = oracle_row_atols(stored, shape[-1] if shape else 1, atol, unit) if floating else [0.0] * count
    actual = [draw(_moved(a_dtype, value, rtol, row_atol, exact_tie=math.isinf(unit)))
              for value, row_atol in zip(stored, row_atols)]
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.array(expected, dtype=np.float64 if floating else object).astype(e_dtype).reshape(shape)
        a = np.array(actual, dtype=np.float64 if floating else object).astype(a_dtype).reshape(shape)
    event(f"{'float' if floating else 'int'}: {a_dtype} vs {e_dtype}")
    event(f"unit {unit:g}")
    return a, e, Tolerance(rtol, atol, unit), draw(st.booleans())


def _moved(dtype: str, value, rtol: float, atol: float, exact_tie: bool):
    """A value near `value` in `dtype`'s range: the same, a step of the tolerance's size (`atol`:
    the one in force in value's row), or any. A step onto the bound itself only where the bound is
    computed without an RMS (`exact_tie`): an RMS summed in another order may differ in its last bit."""
    if dtype in FLOATS:
        bound = atol + rtol * abs(float(value)) if math.isfinite(value) else 0.0
        factors = [0.0, 0.5, 0.999, 1.001, 2.0, -0.999, -1.001] + ([1.0] if exact_tie else [])
        step = st.sampled_from(factors).map(lambda f: value + f * bound)
        return st.one_of(st.just(value), step, _element(dtype))
    if dtype == "bool":
        return st.one_of(st.just(bool(value)), st.booleans())
    near = st.integers(-2, 2).map(lambda d: _clamped(dtype, int(value) + d))  # 0 is the value itself
    return st.one_of(near, _element(dtype))


# ---------------------------------------------------------------------------- the property


@settings(max_examples=DRAWS)
@given(pairs())
# A row of values near the float64 maximum: its RMS is finite, but hypot of the values is not (the
# oracle once overflowed there and excused index 3; found by a fresh-clone CI run).
@example((np.array([0.0, 0.0, np.inf, 0.0], dtype=np.float16), np.array([0.0, 0.0, 1.79769313e308, 1.79769313e308]),
          Tolerance(rtol=1e-05, atol=1e-05, unit=1.0), False))
# A difference exactly on the bound is close (|a - e| <= bound: 0.75 = 0.25 + 0.5 x 1, all exact in
# binary), and NaN against NaN is a mismatch unless equal_nan was asked: at 500 draws the generator
# missed both a `<` planted for `<=` and an equal_nan that was ignored (probed in session 9).
@example((np.array([1.75]), np.array([1.0]), Tolerance(rtol=0.5, atol=0.25, unit=INF), False))
@example((np.array([math.nan, 1.0], dtype=np.float32), np.array([math.nan, 1.0]), Tolerance(rtol=1e-5, atol=1e-5, unit=INF),
          False))
@example((np.array([math.nan, 1.0], dtype=np.float32), np.array([math.nan, 1.0]), Tolerance(rtol=1e-5, atol=1e-5, unit=INF),
          True))
# Integers differenced exactly: 2**53 + 1 against 2**53 is 1 apart, 0 if taken through float64.
@example((np.array([2**53 + 1], dtype=np.int64), np.array([2**53], dtype=np.int64), Tolerance(rtol=1e-5, atol=1e-5, unit=INF),
          False))
def test_compare_agrees_with_the_oracle(pair):
    a, e, tol, equal_nan = pair
    floating = e.dtype.kind == "f"
    close = oracle_close(a.ravel().tolist(), e.ravel().tolist(), tol.rtol, tol.atol, equal_nan, floating,
                         tol.unit, e.shape[-1] if e.ndim else 1)
    result = compare(a, e, tol, equal_nan=equal_nan)
    mismatches = [i for i, ok in enumerate(close) if not ok]
    assert result.passed == (not mismatches), (a, e, tol, result)
    assert result.mismatches == len(mismatches)
    first = None if not mismatches else tuple(int(i) for i in np.unravel_index(mismatches[0], e.shape))
    assert result.first_mismatch_index == first
    if floating:
        values = [float(x) for x in a.ravel().tolist()], [float(x) for x in e.ravel().tolist()]
        assert (result.nan_count_actual, result.nan_count_expected) == tuple(sum(map(math.isnan, v)) for v in values)
        assert (result.inf_count_actual, result.inf_count_expected) == tuple(sum(map(math.isinf, v)) for v in values)
    else:
        assert result.tol.exact, result.tol
        worst = max((abs(int(x) - int(y)) for x, y in zip(a.ravel().tolist(), e.ravel().tolist())), default=0)
        assert result.max_abs_err == float(worst)


def test_the_oracle_on_known_values():
    """Hand-worked answers, so a broken oracle cannot agree with a broken compare()."""
    assert oracle_close([100001], [100000], 1e-5, 1e-5, False, floating=False) == [False]
    assert oracle_close([1.0 + 2e-5], [1.0], 1e-5, 1e-5, False, floating=True) == [True]
    assert oracle_close([1.0 + 3e-5, math.nan, math.inf], [1.0, math.nan, math.inf], 1e-5, 1e-5, False,
                        floating=True) == [False, False, True]
    assert oracle_close([math.nan], [math.nan], 0.0, 0.0, True, floating=True) == [True]
    # Rows of 4: [3, 4, 0, 0] has RMS 2.5 (atol 2.5e-5 at unit 1), [0.5, 0, 0, inf] RMS 0.5 / sqrt(3).
    e = [3.0, 4.0, 0.0, 0.0, 0.5, 0.0, 0.0, math.inf]
    a = [3.0, 4.0, 2.4e-5, 2.6e-5, 0.5, 0.9e-5, 1.1e-5, math.inf]
    assert oracle_close(a, e, 0.0, 1e-5, False, True, unit=1.0, row_length=4) == [True, True, True, False,
                                                                                  True, True, False, True]
    assert oracle_close(a, e, 0.0, 1e-5, False, True, unit=INF, row_length=4)[2] is False
    for moved, verdict in ((1.2e-5, True), (1.3e-5, False)):  # unit 2: atol 1e-5 x 2.5 / 2 = 1.25e-5
        assert oracle_close([moved, 0.0, 3.0, 4.0], [0.0, 0.0, 3.0, 4.0], 0.0, 1e-5, False, True, 2.0, 4)[0] is verdict
    assert oracle_row_atols([1e300, -1e300], 2, 1.0, 1.0) == [1e300, 1e300]


def test_the_table_float_rows_are_the_rule_restated_here():
    """The rule the property checks is the gate's: the table's float rows carry row unit 1."""
    from verifier.tolerance import DEFAULT_TOLERANCES
    assert {name: DEFAULT_TOLERANCES[name].unit for name in ("float16", "bfloat16", "float32", "float64")} == {
        "float16": 1.0, "bfloat16": 1.0, "float32": 1.0, "float64": 1.0}
