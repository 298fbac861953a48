"""Per-dtype comparison tolerances: data, not literals sprinkled in tests.

An element passes when |actual - expected| <= atol + rtol * |expected| (torch.testing's rule).
Cases take their tolerance from `tolerance_for(dtype)`; a case that needs another one passes
rtol and atol together, so an override is always a complete, reviewable pair.

Where exact comparison holds (each entry names its evidence; a case must keep it true):
  - integer and bool outputs (token ids, expert ids, routing-replay tables, masks): always.
  - floating-point outputs: only where a measurement shows both modes run the same kernels in
    the same order; record each such measurement here with its scope (backend, device, dtype).
    * Graph vs eager, backends `static` and `uncompiled`, CPU, float32, Paddle 3.3.1: bitwise
      equal when a piecewise step fills its capture size exactly, and when a step above the
      largest size falls back to eager; `static` vs `uncompiled` on the same padded buffers,
      padded rows included. Evidence: cases/test_graph.py under the `ci` profile and a `nightly`
      run of 5,040 examples, no failure.
    * Not exact, so the float32 row: a step padded above its token count (Paddle's CPU GEMM
      blocks by row count, so a row's sum order depends on the row count modulo 8 when K >= 128,
      and float32 rsqrt/exp round a buffer's vector body and scalar tail differently: 1-2 ulp),
      and a decode step replayed as one whole-model graph (its fixed-shape attention sums over
      the whole slot table). Measured worst case 2e-6 absolute (fixture), 7e-6 (hidden 1024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """A complete (rtol, atol) pair; both finite and >= 0."""

    rtol: float
    atol: float

    def __post_init__(self) -> None:
        for field in ("rtol", "atol"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Tolerance.{field} must be finite and >= 0, got {value!r}")

    @property
    def exact(self) -> bool:
        """True when only bit-for-bit equal values (up to +0 == -0) pass."""
        return self.rtol == 0 and self.atol == 0

    def __str__(self) -> str:
        return "exact" if self.exact else f"rtol={self.rtol:g}, atol={self.atol:g}"


EXACT = Tolerance(0.0, 0.0)

# dtype name -> default tolerance, and why.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # eps 2.2e-16. Reference computations in float64 differ only by summation order; 1e-12 leaves
    # ~4,500 eps for reductions over the longest axes we use (hidden 4096, vocab 151k).
    "float64": Tolerance(1e-12, 1e-12),
    # eps 1.2e-7. Matmul reassociation across batch shapes: GEMM kernels pick a different blocking
    # (and split-K) for a different padded M, so the per-element sum order changes with the capture
    # size; the error grows like sqrt(K) * eps (~7.6e-6 at K = 4096). atol covers outputs that
    # cancel to near zero (residual sums, logits around 0), where rtol alone would be ~0.
    "float32": Tolerance(1e-5, 1e-5),
    # eps 7.8e-3 (8 significant bits). Each mode rounds its float32 accumulation to bfloat16 on
    # its own; sums that straddle a rounding boundary come out one ulp apart (up to 7.8e-3
    # relative at the bottom of a binade) and a chain of bf16 ops can add another: 2 ulps, 1.6e-2
    # (torch.testing's bfloat16 rtol). atol 1e-2 for near-zero activations after cancellation.
    "bfloat16": Tolerance(1.6e-2, 1e-2),
    # eps 9.8e-4 (11 significant bits): one flipped rounding at the output is ~1e-3.
    "float16": Tolerance(1e-3, 1e-3),
    # Discrete values (ids, tables, masks): any difference is a real divergence.
    "bool": EXACT,
    "int8": EXACT,
    "int16": EXACT,
    "int32": EXACT,
    "int64": EXACT,
    "uint8": EXACT,
    "uint16": EXACT,
    "uint32": EXACT,
    "uint64": EXACT,
}


def dtype_name(dtype: object) -> str:
    """Canonical name of a NumPy dtype, scalar type, dtype string or Paddle dtype ("paddle.float32")."""
    spec = dtype if isinstance(dtype, type) else str(dtype).removeprefix("paddle.")
    try:
        return np.dtype(spec).name
    except TypeError:  # names NumPy does not know, such as "bfloat16" without ml_dtypes
        return str(spec)


def tolerance_for(dtype: object, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """The table tolerance for `dtype`, or the override (rtol, atol) given together.

    Raises ValueError for a dtype not in DEFAULT_TOLERANCES, and for an override with only one of
    rtol / atol (naming the missing one).
    """
    name = dtype_name(dtype)
    if name not in DEFAULT_TOLERANCES:
        raise ValueError(f"no tolerance for dtype {name!r}; known: {sorted(DEFAULT_TOLERANCES)}")
    if rtol is None and atol is None:
        return DEFAULT_TOLERANCES[name]
    if rtol is None or atol is None:
        missing = "rtol" if rtol is None else "atol"
        raise ValueError(f"tolerance override for {name}: {missing} is missing; give rtol and atol together")
    return Tolerance(rtol, atol)
