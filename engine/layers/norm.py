"""RMSNorm, written out by hand: Paddle's fused rms-norm kernels are missing or crash on this CPU.

Also the tensor-parallel step that ends every row-parallel projection: all-reduce the partial
sums, add the residual, normalise. Up to a token bound it runs fused, folding the residual into
the reduction (each rank adds residual / W to its partial sum, so one pass over the data does
both), as fused all-reduce kernels do within their workspace; above the bound it runs the plain
all-reduce, then the add. Both give the same answer within float32 rounding; with one rank they
are bitwise identical.
"""

from __future__ import annotations

from typing import Callable

import paddle

from engine.layers.scalars import operand


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis, in float32 (as the HF reference)."""
    variance = (x * x).mean(axis=-1, keepdim=True)  # [..., 1]
    return weight * (x * paddle.rsqrt(variance + operand(eps, variance)))


def rms_norm_eps_outside(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """Failpoint norm.eps_outside_sqrt: x / (sqrt(mean(x^2)) + eps) * weight, the epsilon added
    outside the square root (a fused-kernel slip; within float32 rounding of the right formula's
    neighbour runs, 5-10x the rounding error against a float64 truth)."""
    root = paddle.sqrt((x * x).mean(axis=-1, keepdim=True))  # [..., 1]
    return weight * (x / (root + operand(eps, root)))


def all_reduce_add_rms_norm(partial: paddle.Tensor, residual: paddle.Tensor, weight: paddle.Tensor, eps: float,
                            all_reduce: Callable[[paddle.Tensor], paddle.Tensor], world: int,
                            max_token_num: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """partial [T, H] (this rank's share of a sum over ranks) -> (norm(sum + residual), sum + residual)."""
    if partial.shape[0] <= max_token_num:
        summed = all_reduce(partial + residual / operand(world, residual) if world > 1 else partial + residual)
    else:
        summed = all_reduce(partial) + residual
    return rms_norm(summed, weight, eps), summed
