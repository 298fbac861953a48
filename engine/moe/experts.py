"""Routed and shared experts, in the static (dense, masked) form that a captured graph allows.

Every expert runs on every row and a [T, E] combine matrix, zero where a row did not pick the
expert, weights the results. No shape depends on the routing, so the same code is eager and
captured; padded rows carry id -1 and weight 0 and so add nothing. The cost is E/k times the
sparse FLOPs, affordable for the gate's checkpoints; a capacity-based grouped GEMM can replace
`routed_experts` behind the same signature on a GPU.
"""

from __future__ import annotations

import paddle

from engine.layers.activation import silu_and_mul


def combine_matrix(ids: paddle.Tensor, weights: paddle.Tensor, num_experts: int) -> paddle.Tensor:
    """ids/weights [T, k] -> [T, E] with weights[t, j] at column ids[t, j]; id -1 matches no column."""
    experts = paddle.arange(num_experts, dtype=ids.dtype)  # [E]
    hits = (ids.unsqueeze(-1) == experts).astype(weights.dtype)  # [T, k, E]
    return (hits * weights.unsqueeze(-1)).sum(axis=1)


def routed_experts(x: paddle.Tensor, ids: paddle.Tensor, weights: paddle.Tensor,
                   gate_up: paddle.Tensor, down: paddle.Tensor) -> paddle.Tensor:
    """x [T, H]; gate_up [E, H, 2I]; down [E, I, H] -> sum over chosen experts of weight * expert(x)."""
    combine = combine_matrix(ids, weights, gate_up.shape[0])  # [T, E]
    hidden = paddle.matmul(x.unsqueeze(0), gate_up)  # [E, T, 2I]
    out = paddle.matmul(silu_and_mul(hidden), down)  # [E, T, H]
    return paddle.einsum("te,eth->th", combine, out)


def dense_mlp(x: paddle.Tensor, gate_up: paddle.Tensor, down: paddle.Tensor) -> paddle.Tensor:
    """The SwiGLU MLP of dense layers and shared experts: x [T, H]; gate_up [H, 2I]; down [I, H]."""
    return paddle.matmul(silu_and_mul(paddle.matmul(x, gate_up)), down)
