"""The functions a graph backend captures, and what each takes as input (so the graph runner can
own static buffers).

`piece_function(model, i)` is piece i as a named function of its input tensors, made once per piece
and reused for every capture size: the static backend keeps one `to_static` per function object
and builds one fixed-shape program per size from it.

Row inputs have one row per token: real rows are copied in and the padded rows after them are set
to a defined value (0) before every replay. `num_real` is a one-element tensor holding the count
of real rows; pieces use it to route padded rows to expert -1. The whole-model decode graph also
reads the KV cache: those tensors are not copied but handed over as they are (the cache owns them
and never reallocates them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import paddle
from paddle.jit.dy2static.convert_operators import convert_load

from engine.models.moe_decoder import MoEDecoder

Tensors = tuple[paddle.Tensor, ...]


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
RESIDUAL = "residual"  # the input the graph runner chains from the previous piece's output
REPLAY_IDS = "replay_ids"  # routing replay: [T, moe_layers, top_k] recorded ids, shared by a size's pieces


def replay_input(shape: tuple[int, int] | None) -> tuple[PieceInput, ...]:
    """The routing-replay input (shape (moe_layers, top_k)), or none when not replaying."""
    return () if shape is None else (PieceInput(REPLAY_IDS, "int64", shape),)


def full_decode_inputs(max_len: int) -> tuple[PieceInput, ...]:
    """Inputs of `MoEDecoder.full_decode` before the cache list: max_len is the slot-table width.
    A replaying runner appends the replay input (still before the cache list)."""
    return (PieceInput("token_ids", "int64", ()), POSITIONS, NUM_REAL, PieceInput("slots", "int64", (max_len,)),
            PieceInput("context_lens", "int64", ()))


def piece_inputs(index: int, attn_width: int, hidden_size: int,
                 replay_shape: tuple[int, int] | None = None) -> tuple[PieceInput, ...]:
    """The inputs of piece `index`, in the order `MoEDecoder.piece` takes them. `attn_width` is this
    rank's attention output width (its query heads x head_dim)."""
    if index == 0:
        return PieceInput("token_ids", "int64", ()), POSITIONS, NUM_REAL
    return (PieceInput("attn_out", "float32", (attn_width,)), PieceInput(RESIDUAL, "float32", (hidden_size,)),
            POSITIONS, NUM_REAL) + replay_input(replay_shape)


def piece_function(model: MoEDecoder, index: int, replays: bool = False) -> Callable[..., Tensors]:
    """Piece `index` as a plain named function (to_static needs named parameters, not *args).
    With `replays`, later pieces take the routing-replay ids as a fifth input."""

    def first_piece(token_ids, positions, num_real) -> Tensors:
        return _trace(model, 0, (token_ids, positions, num_real))

    def later_piece(attn_out, residual, positions, num_real) -> Tensors:
        return _trace(model, index, (attn_out, residual, positions, num_real))

    def replaying_piece(attn_out, residual, positions, num_real, replay_ids) -> Tensors:
        return _trace(model, index, (attn_out, residual, positions, num_real, replay_ids))

    return first_piece if index == 0 else replaying_piece if replays else later_piece


def full_decode_function(model: MoEDecoder, replays: bool = False) -> Callable[..., Tensors]:
    """`model.full_decode` as a plain function of its inputs and the KV cache list (and, with
    `replays`, the routing-replay ids)."""

    def full_decode(token_ids, positions, num_real, slots, context_lens, caches) -> Tensors:
        return _trace(model, None, (token_ids, positions, num_real, slots, context_lens, caches))

    def replaying_full_decode(token_ids, positions, num_real, slots, context_lens, replay_ids, caches) -> Tensors:
        return _trace(model, None, (token_ids, positions, num_real, slots, context_lens, caches, replay_ids))

    return replaying_full_decode if replays else full_decode


@paddle.jit.not_to_static
def _trace(model: MoEDecoder, index: int | None, inputs: tuple) -> Tensors:
    """Run piece `index` (None: the whole-model decode step) as ordinary Python.

    Marked not_to_static so that Paddle's AST converter leaves the model code alone: the pieces have
    no tensor-dependent control flow, so running them as they are while a program is being built
    records the same ops, without the converter rewriting every method they call on every trace
    (that alone made capture several times slower). The weights must then enter the program as parameters,
    which is what the converted code does to each tensor it loads: `convert_load` does the same
    here. Outside a to_static trace it returns the tensor unchanged, so the eager, uncompiled and
    CUDA graph paths run this same function.
    """
    view = model.with_weights(convert_load, index)
    if index is None:
        return view.full_decode(*inputs)
    return view.piece(index, *inputs)
