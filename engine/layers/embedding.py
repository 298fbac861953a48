"""Token embedding lookup and the language-model head."""

from __future__ import annotations

from typing import Callable

import paddle
import paddle.nn.functional as F


def embed(token_ids: paddle.Tensor, table: paddle.Tensor) -> paddle.Tensor:
    """token_ids [T] int64, table [V, H] -> [T, H]."""
    return F.embedding(token_ids, table)


def vocab_parallel_embed(token_ids: paddle.Tensor, table: paddle.Tensor, first_id: int,
                         all_reduce: Callable[[paddle.Tensor], paddle.Tensor]) -> paddle.Tensor:
    """Lookup in this rank's rows [first_id, first_id + V/W) of the vocabulary; ids owned by other
    ranks give zero rows here, and the all-reduce fills them in."""
    local = token_ids - first_id
    inside = paddle.logical_and(local >= 0, local < table.shape[0])  # [T]
    rows = embed(paddle.where(inside, local, paddle.zeros_like(local)), table)  # [T, H]
    return all_reduce(rows * inside.unsqueeze(-1).astype(rows.dtype))


def lm_head(hidden: paddle.Tensor, table: paddle.Tensor) -> paddle.Tensor:
    """hidden [N, H], table [V, H] (the HF layout) -> logits [N, V]."""
    return paddle.matmul(hidden, table, transpose_y=True)
