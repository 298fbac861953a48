"""Python-float operands that keep a float64 engine's precision inside captured graphs.

Paddle's static programs store a scalar operand (`x + 1e-5`, `x * 0.1`) as a float32 attribute of a
scale op, whatever the tensor's dtype: in a float64 piece `x + 1e-5` adds 9.99999974738e-06
(measured: 2.5e-13 off, which moved the Qwen fixture's piecewise logits 1.6e-11 from the float64
reference against 1.5e-15 eagerly). So a float64 tensor's constants become [1] float64 tensors
(`full` keeps a double exactly); a float32 tensor gets the Python float back, its ops unchanged.
"""

from __future__ import annotations

import paddle


def operand(value: float, like: paddle.Tensor):
    """`value` as an operand of arithmetic with `like`: exact in `like`'s dtype, eager or captured."""
    if like.dtype == paddle.float64:
        return paddle.full([1], value, dtype="float64")
    return value
