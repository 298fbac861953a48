"""SwiGLU, the gated activation of every MLP and expert in the supported models."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F


def silu_and_mul(gate_up: paddle.Tensor) -> paddle.Tensor:
    """[..., 2I] laid out as (gate | up) -> silu(gate) * up, [..., I]."""
    gate, up = paddle.chunk(gate_up, 2, axis=-1)
    return F.silu(gate) * up
