"""Compare one actual array with one expected array: pure data, no rendering.

`compare` returns a `Comparison` that names the worst element and its index (torch.testing
style), counts mismatches, NaN and Inf, and measures rel L2, ULP distance and argmax / top-k id
agreement along the last axis. `assert_close` / `assert_equal` raise with its message.

Inputs are NumPy arrays or anything with `.numpy()` (Paddle tensors). A Paddle bfloat16 tensor
is recognised by its dtype and its raw uint16 bits are decoded; pass the tensor itself, because
its `.numpy()` result alone is indistinguishable from a uint16 array.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from verifier.recording import note
from verifier.tolerance import DEFAULT_TOLERANCES, EXACT, Tolerance, tolerance_for

Index = tuple[int, ...]

# dtype name -> (signed integer type of the same width, right shift from that width's ULP to the
# dtype's). bfloat16 arrives decoded to float32 with its low 16 bits zero.
_ULP_BITS: dict[str, tuple[type, int]] = {
    "float16": (np.int16, 0),
    "bfloat16": (np.int32, 16),
    "float32": (np.int32, 0),
    "float64": (np.int64, 0),
}


@dataclass(frozen=True)
class Comparison:
    """The outcome of one comparison. Errors are measured in float64 over the flattened arrays.

    An element is close when |a - e| <= atol * max(1, rms(e's row) / unit) + rtol * |e| for finite
    a and e (verifier/tolerance.py: a row is a slice along the last axis of the expected array, its
    RMS over its finite elements; unit inf makes atol absolute), or when a == e (equal infinities,
    +0 and -0), or when both are NaN and the comparison allowed equal_nan. max_abs_atol is the atol
    in force in the row of the greatest absolute error (0.0 for exact and empty comparisons).
    Error maxima and their indices prefer NaN errors (a NaN against a number), so the index points
    at the NaN; indices are None for empty arrays. max_ulp skips positions where either side is NaN.
    """

    name: str
    shape: Index
    dtype: str
    tol: Tolerance
    total: int
    mismatches: int
    max_abs_err: float
    max_abs_index: Index | None
    max_rel_err: float
    max_rel_index: Index | None
    rel_l2: float
    max_ulp: int | None
    nan_count_actual: int
    nan_count_expected: int
    inf_count_actual: int
    inf_count_expected: int
    argmax_agreement: float | None
    topk: int
    topk_agreement: float | None
    first_mismatch_index: Index | None
    max_abs_atol: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every element is close."""
        return self.mismatches == 0

    def message(self) -> str:
        """A multi-line, torch.testing-style account: counts, worst elements and their indices."""
        lines = [self._headline(), self._mismatch_line()]
        if self.total:
            lines += self._worst_lines()
        lines += self._extra_lines()
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-safe plain data (lists, ints, floats; non-finite floats as "nan" / "inf" / "-inf")."""
        return json_safe({**asdict(self), "passed": self.passed})

    def _headline(self) -> str:
        word = "equal" if self.tol.exact else "close"
        verdict = word.capitalize() if self.passed else f"Not {word}"
        return f"{verdict} ({self.dtype}, shape {self.shape}, {self.tol})"

    def _mismatch_line(self) -> str:
        share = self.mismatches / self.total if self.total else 0.0
        return f"Mismatched elements: {self.mismatches} / {self.total} ({share:.1%})"

    def _worst_lines(self) -> list[str]:
        return [
            f"Greatest absolute difference: {self.max_abs_err:.6g} at index {self.max_abs_index} "
            f"(up to {self.max_abs_atol:g} allowed{self._scaled_text()})",
            f"Greatest relative difference: {self.max_rel_err:.6g} at index {self.max_rel_index} "
            f"(up to {self.tol.rtol:g} allowed)",
        ]

    def _scaled_text(self) -> str:
        """How the worst row's atol came from the table's, when its RMS scaled it."""
        if self.max_abs_atol <= self.tol.atol:
            return ""
        per = "" if self.tol.unit == 1 else f" / {self.tol.unit:g}"
        return f": atol {self.tol.atol:g} x row RMS{per} {self.max_abs_atol / self.tol.atol:.4g}"

    def _extra_lines(self) -> list[str]:
        ulp = "" if self.max_ulp is None else f", max ULP: {self.max_ulp}"
        lines = [f"rel L2: {self.rel_l2:.6g}{ulp}"]
        counts = (self.nan_count_actual, self.nan_count_expected, self.inf_count_actual, self.inf_count_expected)
        if any(counts):
            lines.append("NaN: actual {}, expected {}; Inf: actual {}, expected {}".format(*counts))
        if self.argmax_agreement is not None:
            lines.append(f"argmax agreement: {self.argmax_agreement:.1%}{self._topk_text()}")
        if self.first_mismatch_index is not None:
            lines.append(f"First mismatch at index {self.first_mismatch_index}")
        return lines

    def _topk_text(self) -> str:
        if self.topk_agreement is None:
            return ""
        return f", top-{self.topk} agreement: {self.topk_agreement:.1%}"


def compare(
    actual: object,
    expected: object,
    tol: Tolerance | None = None,
    *,
    name: str = "",
    equal_nan: bool = False,
    topk: int = 5,
) -> Comparison:
    """Compare `actual` with `expected` element-wise; never raises on a numerical difference.

    tol None takes tolerance_for(expected's dtype); integer and bool data always compare exactly,
    whatever `tol` (Comparison.tol is then EXACT). Raises ValueError when the shapes differ (a
    caller's plumbing bug, not a numerical one), when a dtype has no row in DEFAULT_TOLERANCES
    (complex, float128, object), when one side is integer/bool and the other floating point, or
    when topk < 1. max_ulp is None for integer/bool data and when the two dtypes differ;
    argmax/top-k agreement is None for 0-d and empty arrays, top-k also when the last axis is
    shorter than topk.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    a, a_dtype = _to_numpy(actual)
    e, e_dtype = _to_numpy(expected)
    _check_compatible(a, e, a_dtype, e_dtype, name)
    # Discrete values (ids, tokens, masks) are equal or wrong: a float tolerance would let id
    # 100001 pass for 100000 (rtol 1e-5), so integer and bool data always compare exactly.
    tol = EXACT if not _is_float(e_dtype) else tolerance_for(e_dtype) if tol is None else tol
    af, ef = a.astype(np.float64).ravel(), e.astype(np.float64).ravel()
    same = _same(a.ravel(), e.ravel(), equal_nan)
    abs_err = _abs_errors(af, ef, same) if _is_float(e_dtype) else _int_abs_errors(a.ravel(), e.ravel(), same)
    rel_err = _rel_errors(abs_err, ef)
    bounds = None if tol.exact else tol.bounds(e).ravel()  # rows of the expected array, before ravel
    close = _close(af, ef, abs_err, same, bounds)
    max_abs_err, max_abs_index = _worst(abs_err, e.shape)
    max_rel_err, max_rel_index = _worst(rel_err, e.shape)
    return note(Comparison(  # the gate's report records it (verifier/recording.py)
        name=name,
        shape=tuple(e.shape),
        dtype=e_dtype,
        tol=tol,
        total=int(e.size),
        mismatches=int(np.count_nonzero(~close)),
        max_abs_err=max_abs_err,
        max_abs_index=max_abs_index,
        max_rel_err=max_rel_err,
        max_rel_index=max_rel_index,
        rel_l2=_rel_l2(abs_err, ef),
        max_ulp=_max_ulp(a.ravel(), e.ravel(), a_dtype, e_dtype),
        nan_count_actual=_count(np.isnan, af),
        nan_count_expected=_count(np.isnan, ef),
        inf_count_actual=_count(np.isinf, af),
        inf_count_expected=_count(np.isinf, ef),
        argmax_agreement=_argmax_agreement(a, e),
        topk=topk,
        topk_agreement=_topk_agreement(a, e, topk),
        first_mismatch_index=_first_index(~close, e.shape),
        max_abs_atol=_row_atol(tol, e, max_abs_index),
    ))


def assert_close(
    actual: object, expected: object, tol: Tolerance | None = None, *, name: str = "", equal_nan: bool = False
) -> Comparison:
    """`compare`, raising AssertionError("{name}: {message}") unless it passed; returns the Comparison."""
    result = compare(actual, expected, tol, name=name, equal_nan=equal_nan)
    if not result.passed:
        raise AssertionError(f"{name}: {result.message()}")
    return result


def assert_equal(actual: object, expected: object, *, name: str = "") -> Comparison:
    """`assert_close` with EXACT: every element equal (+0 == -0; NaN never equals NaN)."""
    return assert_close(actual, expected, EXACT, name=name)


def rel_l2(actual: object, expected: object) -> float:
    """||actual - expected|| / ||finite expected||; 0.0 when the error is zero everywhere.

    Equal infinities count as zero error; a NaN anywhere in the error makes the result NaN.
    Raises ValueError under the same shape and dtype rules as `compare`.
    """
    a, a_dtype = _to_numpy(actual)
    e, e_dtype = _to_numpy(expected)
    _check_compatible(a, e, a_dtype, e_dtype, "rel_l2")
    af, ef = a.astype(np.float64).ravel(), e.astype(np.float64).ravel()
    return _rel_l2(_abs_errors(af, ef, _same(af, ef, equal_nan=False)), ef)


def _to_numpy(x: object) -> tuple[np.ndarray, str]:
    """(array, dtype name); bfloat16 comes back decoded to float32 with the name "bfloat16"."""
    bf16 = False
    if hasattr(x, "numpy"):
        bf16 = str(getattr(x, "dtype", "")).endswith("bfloat16")
        x = x.numpy()
    arr = np.asarray(x)
    if bf16 or arr.dtype.name == "bfloat16":
        return _bfloat16_to_float32(arr), "bfloat16"
    return arr, arr.dtype.name


def _bfloat16_to_float32(arr: np.ndarray) -> np.ndarray:
    """Exact widening: a bfloat16 is the upper half of the float32 with the same bits."""
    bits = arr.view(np.uint16).astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32)


def _check_compatible(a: np.ndarray, e: np.ndarray, a_dtype: str, e_dtype: str, name: str) -> None:
    """Raise ValueError for different shapes, unsupported dtypes, or integer/bool against floating point."""
    label = f"{name}: " if name else ""
    unsupported = sorted({a_dtype, e_dtype} - DEFAULT_TOLERANCES.keys())
    if unsupported:
        raise ValueError(f"{label}unsupported dtype(s) {unsupported}; supported: {sorted(DEFAULT_TOLERANCES)}")
    if a.shape != e.shape:
        raise ValueError(
            f"{label}shape mismatch: actual {a.shape} vs expected {e.shape}; "
            "a shape mismatch is a bug in the caller's plumbing (padding, slicing), "
            "not a numerical difference"
        )
    if _is_float(a_dtype) != _is_float(e_dtype):
        raise ValueError(f"{label}dtype kind mismatch: actual {a_dtype} vs expected {e_dtype}")


def _is_float(dtype: str) -> bool:
    return dtype in _ULP_BITS


def _same(a: np.ndarray, e: np.ndarray, equal_nan: bool) -> np.ndarray:
    """Element-wise equality in the native dtypes, with NaN == NaN when equal_nan."""
    same = a == e
    if equal_nan and a.dtype.kind == "f":
        same |= np.isnan(a) & np.isnan(e)
    return same


def _abs_errors(af: np.ndarray, ef: np.ndarray, same: np.ndarray) -> np.ndarray:
    """|a - e|, 0 where `same` (so equal infinities give 0, not NaN)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(same, 0.0, np.abs(af - ef))


def _int_abs_errors(a: np.ndarray, e: np.ndarray, same: np.ndarray) -> np.ndarray:
    """|a - e| for integer/bool data, differenced exactly (as Python ints: no int64 overflow, no
    float64 rounding that would make 2**53 + 1 and 2**53 zero apart), then as float64 (>= 1)."""
    err = np.zeros(a.shape, np.float64)
    differ = np.flatnonzero(~same)
    err[differ] = [float(abs(int(x) - int(y))) for x, y in zip(a[differ].tolist(), e[differ].tolist())]
    return err


def _rel_errors(abs_err: np.ndarray, ef: np.ndarray) -> np.ndarray:
    """|a - e| / |e|: 0 where the error is 0, inf where e is 0 or the error is infinite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = abs_err / np.abs(ef)
    rel[abs_err == 0] = 0.0
    rel[np.isinf(abs_err)] = np.inf
    return rel


def _close(af: np.ndarray, ef: np.ndarray, abs_err: np.ndarray, same: np.ndarray, bounds: np.ndarray | None) -> np.ndarray:
    """The pass mask: `same`, or finite on both sides and within the element's bound (None: exact)."""
    if bounds is None:
        return same
    finite = np.isfinite(af) & np.isfinite(ef)
    with np.errstate(invalid="ignore"):
        return same | (finite & (abs_err <= bounds))


def _row_atol(tol: Tolerance, e: np.ndarray, index: Index | None) -> float:
    """The atol in force in the row (last axis) of `e` holding `index`; 0.0 when exact or empty."""
    if tol.exact or index is None:
        return 0.0
    row = e[index[:-1]] if e.ndim else e
    return float(tol.row_atol(row[np.newaxis] if np.ndim(row) else row).ravel()[0])


def _worst(err: np.ndarray, shape: Index) -> tuple[float, Index | None]:
    """The greatest error and its index; a NaN error counts as greatest (np.argmax picks the first NaN)."""
    if err.size == 0:
        return 0.0, None
    flat = int(np.argmax(err))
    return float(err[flat]), _unravel(flat, shape)


def _first_index(mask: np.ndarray, shape: Index) -> Index | None:
    """Index of the first True in C order, or None."""
    hits = np.flatnonzero(mask)
    return _unravel(int(hits[0]), shape) if hits.size else None


def _unravel(flat: int, shape: Index) -> Index:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _rel_l2(abs_err: np.ndarray, ef: np.ndarray) -> float:
    """||error|| / ||finite expected||; 0.0 when the error norm is 0 (inf when only e is 0)."""
    num = float(np.linalg.norm(abs_err))
    if num == 0.0:
        return 0.0
    den = float(np.linalg.norm(ef[np.isfinite(ef)]))
    return num / den if den else math.inf


def _max_ulp(a: np.ndarray, e: np.ndarray, a_dtype: str, e_dtype: str) -> int | None:
    """Greatest ULP distance over positions where neither side is NaN; None for ints or mixed dtypes."""
    if a_dtype != e_dtype or not _is_float(e_dtype):
        return None
    keep = ~(np.isnan(a) | np.isnan(e))
    if not keep.any():
        return None
    int_type, shift = _ULP_BITS[e_dtype]
    return int(_ulp_distance(a[keep], e[keep], int_type).max()) >> shift


def _ulp_distance(a: np.ndarray, e: np.ndarray, int_type: type) -> np.ndarray:
    """Number of representable values between a and e (uint64; +0 and -0 are 0 apart)."""
    oa, oe = _ordered(a, int_type), _ordered(e, int_type)
    hi, lo = np.maximum(oa, oe), np.minimum(oa, oe)
    return hi.astype(np.uint64) - lo.astype(np.uint64)  # modular: exact even past int64 range


def _ordered(x: np.ndarray, int_type: type) -> np.ndarray:
    """Map float bits to int64 that order like the floats: sign-magnitude to two's complement."""
    bits = x.view(int_type).astype(np.int64)
    magnitude = bits & np.int64(np.iinfo(int_type).max)
    return np.where(bits < 0, -magnitude, magnitude)


def _count(predicate, values: np.ndarray) -> int:
    return int(np.count_nonzero(predicate(values)))


def _rows(x: np.ndarray) -> np.ndarray:
    """[rows, last] float64 view of x; a 1-d array is one row."""
    return x.astype(np.float64).reshape(-1, x.shape[-1])


def _argmax_agreement(a: np.ndarray, e: np.ndarray) -> float | None:
    """Fraction of rows (along the last axis) whose argmax agrees; None for 0-d or empty arrays."""
    if a.ndim == 0 or a.size == 0:
        return None
    return float(np.mean(np.argmax(_rows(a), axis=-1) == np.argmax(_rows(e), axis=-1)))


def _topk_agreement(a: np.ndarray, e: np.ndarray, k: int) -> float | None:
    """Mean over rows of |top-k ids of a ∩ top-k ids of e| / k; None for 0-d, empty or last axis < k."""
    if a.ndim == 0 or a.size == 0 or a.shape[-1] < k:
        return None
    ids_a, ids_e = _topk_ids(_rows(a), k), _topk_ids(_rows(e), k)  # [R, k] each
    shared = (ids_a[:, :, None] == ids_e[:, None, :]).any(axis=-1)  # [R, k]: id of a also in e's top-k
    return float(np.mean(shared))


def _topk_ids(rows: np.ndarray, k: int) -> np.ndarray:
    """[rows, k] ids of the k largest values per row (order within the k unspecified)."""
    return np.argpartition(-rows, k - 1, axis=-1)[:, :k]


def json_safe(value: object) -> object:
    """Tuples to lists, non-finite floats to strings, recursively."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
