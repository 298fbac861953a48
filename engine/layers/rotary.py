"""Rotary position embedding, half-split layout, optionally on only the first `rotary_dim` dims.

GLM-4.5 rotates half of each head (partial_rotary_factor 0.5); Qwen3-MoE rotates all of it. The
rotated part is split into two halves (x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin), the
"rotate_half" layout of the Hugging Face reference, not the interleaved one.
"""

from __future__ import annotations

import numpy as np
import paddle


def rope_table(rotary_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables, each [max_positions, rotary_dim], computed in float32 as the reference does."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)  # [rd/2]
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # [P, rd/2]
    angles = np.concatenate([freqs, freqs], axis=-1)  # [P, rd]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rotary(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """x [T, heads, D]; cos/sin [T, rd] already gathered at each token's position."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, rd]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = paddle.chunk(x_rot, 2, axis=-1)
    rotated = x_rot * cos + paddle.concat([-x2, x1], axis=-1) * sin
    return rotated if x_pass.shape[-1] == 0 else paddle.concat([rotated, x_pass], axis=-1)
