"""Token embedding lookup and the language-model head."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F


def embed(token_ids: paddle.Tensor, table: paddle.Tensor) -> paddle.Tensor:
    """token_ids [T] int64, table [V, H] -> [T, H]."""
    return F.embedding(token_ids, table)


def lm_head(hidden: paddle.Tensor, table: paddle.Tensor) -> paddle.Tensor:
    """hidden [N, H], table [V, H] (the HF layout) -> logits [N, V]."""
    return paddle.matmul(hidden, table, transpose_y=True)
