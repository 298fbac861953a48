"""What each captured function takes as input, so the graph runner can own static buffers.

Row inputs have one row per token: real rows are copied in and the padded rows after them are set
to a defined value (0) before every replay. `num_real` is a one-element tensor holding the count
of real rows; pieces use it to route padded rows to expert -1. The whole-model decode graph also
reads the KV cache: those tensors are not copied but handed over as they are (the cache owns them
and never reallocates them).
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle


@dataclass(frozen=True)
class PieceInput:
    name: str
    dtype: str
    row_shape: tuple[int, ...] | None  # per-token trailing shape; None for the [1] num_real input

    def buffer(self, size: int) -> paddle.Tensor:
        shape = [1] if self.row_shape is None else [size, *self.row_shape]
        return paddle.zeros(shape, dtype=self.dtype)


NUM_REAL = PieceInput("num_real", "int64", None)
POSITIONS = PieceInput("positions", "int64", ())


def full_decode_inputs(max_len: int) -> tuple[PieceInput, ...]:
    """Inputs of `MoEDecoder.full_decode` before the cache list: max_len is the slot-table width."""
    return (PieceInput("token_ids", "int64", ()), POSITIONS, NUM_REAL, PieceInput("slots", "int64", (max_len,)),
            PieceInput("context_lens", "int64", ()))


def piece_inputs(index: int, attn_width: int, hidden_size: int) -> tuple[PieceInput, ...]:
    """The inputs of piece `index`, in the order `MoEDecoder.piece` takes them. `attn_width` is this
    rank's attention output width (its query heads x head_dim)."""
    if index == 0:
        return PieceInput("token_ids", "int64", ()), POSITIONS, NUM_REAL
    return (PieceInput("attn_out", "float32", (attn_width,)), PieceInput("residual", "float32", (hidden_size,)),
            POSITIONS, NUM_REAL)
