"""ForwardContext: everything one step's forward needs besides the weights, built by the runner.

Token ids and positions hold the real tokens only; a graph replay pads them into its own buffers.
The capture guard travels here, never as a process-wide flag: the runner enters the step's scope
through it (`ctx.guard.scope(...)`), and code with side effects asks `ctx.guard.capturing`.
The models never see this object: they take their inputs by name (engine/graph/protocol.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle

from engine.graph.guard import CaptureGuard
from engine.layers.attention import AttentionMetadata


@dataclass(frozen=True)
class ForwardContext:
    token_ids: paddle.Tensor  # [T] int64
    positions: paddle.Tensor  # [T] int64
    num_real: paddle.Tensor  # [1] int64, = T
    attention: AttentionMetadata
    phase: str  # "prefill" (prefill or mixed) or "decode" (decodes only)
    padded_size: int | None  # the capture size replayed; None when the step runs eagerly
    guard: CaptureGuard
    replay_ids: paddle.Tensor | None = None  # [T, moe_layers, top_k] int64: recorded ids to route by (R3 replay)

    @property
    def num_tokens(self) -> int:
        return self.attention.num_tokens
