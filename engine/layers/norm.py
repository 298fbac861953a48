"""RMSNorm, written out by hand: Paddle's fused rms-norm kernels are missing or crash on this CPU."""

from __future__ import annotations

import paddle


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis, in float32 (as the HF reference)."""
    variance = (x * x).mean(axis=-1, keepdim=True)  # [..., 1]
    return weight * (x * paddle.rsqrt(variance + eps))


def add_rms_norm(x: paddle.Tensor, residual: paddle.Tensor, weight: paddle.Tensor,
                 eps: float) -> tuple[paddle.Tensor, paddle.Tensor]:
    """The pre-norm step of a decoder layer: returns (norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed
