"""Linear projections. Weights are stored as [in, out] so a projection is one matmul."""

from __future__ import annotations

import numpy as np
import paddle


def weight_param(hf_weight: np.ndarray) -> paddle.Tensor:
    """A Hugging Face [out, in] weight as a frozen [in, out] tensor (its dtype kept: see `frozen`)."""
    return frozen(np.ascontiguousarray(hf_weight.T))


def frozen(array: np.ndarray) -> paddle.Tensor:
    """A constant tensor: float64 arrays (a float64 engine's weights) stay float64, any other float32."""
    dtype = np.float64 if np.asarray(array).dtype == np.float64 else np.float32
    tensor = paddle.to_tensor(np.asarray(array, dtype=dtype))
    tensor.stop_gradient = True
    return tensor


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor | None = None) -> paddle.Tensor:
    """x [T, in] @ weight [in, out] (+ bias [out]) -> [T, out]."""
    out = paddle.matmul(x, weight)
    return out if bias is None else out + bias
