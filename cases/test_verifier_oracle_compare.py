"""`verifier.compare.compare` verified against a float64 restatement of its documented rule.

The oracle, written here from the contract and never calling the code under test:
  - floating point (float16/32/64, either side, widened to float64 exactly): element i is close
    when a == e (equal infinities, +0 and -0), or both are NaN and equal_nan was asked, or both are
    finite and |a - e| <= atol + rtol * |e|;
  - integer and bool data: close only when equal as integers, whatever the tolerance (an id off
    by one is wrong however large the ids), and the greatest difference is the exact integer one.
Every draw checks the verdict, the mismatch count, the first mismatching index, the NaN / Inf
counts and, for integers, the tolerance reported (exact) and the greatest absolute difference.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

from verifier.compare import compare
from verifier.tolerance import Tolerance

# ci (25 examples) -> 500 draws per property, nightly (2,000) -> 10,000.
DRAWS = max(500, 5 * settings.default.max_examples)
FLOATS = ("float16", "float32", "float64")
INTS = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
TOLERANCES = ((0.0, 0.0), (1e-5, 1e-5), (1.3e-6, 1e-5), (1e-3, 0.0), (0.0, 1e-3), (0.5, 0.25), (2.0, 3.0))


# ---------------------------------------------------------------------------- the oracle


def oracle_close(a: list, e: list, rtol: float, atol: float, equal_nan: bool, floating: bool) -> list[bool]:
    if not floating:
        return [int(x) == int(y) for x, y in zip(a, e)]
    out = []
    for x, y in zip(a, e):
        x, y = float(x), float(y)
        both_nan = math.isnan(x) and math.isnan(y)
        finite = math.isfinite(x) and math.isfinite(y)
        out.append(x == y or (equal_nan and both_nan) or (finite and abs(x - y) <= atol + rtol * abs(y)))
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
    shape = draw(st.sampled_from([(0,), (1,), (4,), (2, 3), (2, 1, 2)]))
    count = int(np.prod(shape))
    rtol, atol = draw(st.sampled_from(TOLERANCES))
    expected = [draw(_element(e_dtype)) for _ in range(count)]
    actual = [draw(_moved(a_dtype, value, rtol, atol)) for value in expected]
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.array(expected, dtype=np.float64 if floating else object).astype(e_dtype).reshape(shape)
        a = np.array(actual, dtype=np.float64 if floating else object).astype(a_dtype).reshape(shape)
    event(f"{'float' if floating else 'int'}: {a_dtype} vs {e_dtype}")
    return a, e, rtol, atol, draw(st.booleans())


def _moved(dtype: str, value, rtol: float, atol: float):
    """A value near `value` in `dtype`'s range: the same, a step of the tolerance's size, or any."""
    if dtype in FLOATS:
        bound = atol + rtol * abs(value) if math.isfinite(value) else 0.0
        step = st.sampled_from([0.0, 0.5, 0.999, 1.0, 1.001, 2.0, -0.999, -1.001]).map(lambda f: value + f * bound)
        return st.one_of(st.just(value), step, _element(dtype))
    if dtype == "bool":
        return st.one_of(st.just(bool(value)), st.booleans())
    near = st.integers(-2, 2).map(lambda d: _clamped(dtype, int(value) + d))  # 0 is the value itself
    return st.one_of(near, _element(dtype))


# ---------------------------------------------------------------------------- the property


@settings(max_examples=DRAWS)
@given(pairs())
def test_compare_agrees_with_the_oracle(pair):
    a, e, rtol, atol, equal_nan = pair
    floating = e.dtype.kind == "f"
    close = oracle_close(a.ravel().tolist(), e.ravel().tolist(), rtol, atol, equal_nan, floating)
    result = compare(a, e, Tolerance(rtol, atol), equal_nan=equal_nan)
    mismatches = [i for i, ok in enumerate(close) if not ok]
    assert result.passed == (not mismatches), (a, e, rtol, atol, result)
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
