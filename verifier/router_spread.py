"""How spread out a checkpoint's router logits are: the same measurement on a big model and on its
shrunk copy, so a reader can see whether shrinking kept the routers' decisiveness.

How: the embeddings of `TOKENS` fixed token ids (drawn without replacement from the vocabulary with
seed `SEED`, below `vocab_size`: pass the smaller model's, so both models see the same ids) stand in for a
MoE layer's input. Each layer's post-attention RMSNorm (the router's input norm) is applied, then
the router; the spread is the standard deviation of all [tokens, experts] logits, in float64. It
skips the attention and earlier layers on purpose: it isolates the router's own scale, and it
reads only the embedding rows, one norm and one router per layer, so it is cheap on a huge model.
"""

from __future__ import annotations

import numpy as np

from engine.checkpoint.hub_schema import EMBED, attention_names, router_names
from engine.config import ModelConfig
from verifier.tensor_reader import TensorReader, open_file

TOKENS = 64
SEED = 0


def router_spread(reader: TensorReader, cfg: ModelConfig, layers, vocab_size: int) -> dict[int, float]:
    """Layer -> std of its router logits over the embeddings of `token_ids(vocab_size)`."""
    hidden = _embeddings(reader, vocab_size)  # [T, H]
    out = {}
    for layer in layers:
        norm = reader.read(attention_names(layer).post_norm).astype(np.float64)  # [H]
        gate = reader.read(router_names(layer).weight).astype(np.float64)  # [E, H]
        normed = hidden / np.sqrt(np.mean(hidden**2, axis=-1, keepdims=True) + cfg.rms_norm_eps) * norm
        out[layer] = float((normed @ gate.T).std())  # [T, E]
    return out


def token_ids(vocab_size: int) -> np.ndarray:
    """The fixed token ids, sorted."""
    rng = np.random.default_rng(SEED)
    return np.sort(rng.choice(vocab_size, size=min(TOKENS, vocab_size), replace=False))


def _embeddings(reader: TensorReader, vocab_size: int) -> np.ndarray:
    with open_file(reader.files[EMBED]) as shard:  # one row at a time: never the whole table
        rows = [shard.read(EMBED, (slice(int(i), int(i) + 1),))[0] for i in token_ids(vocab_size)]
    return np.stack(rows).astype(np.float64)
