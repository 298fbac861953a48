"""A larger GLM-4.5-style decoder with random weights, built in memory (no checkpoint file).

Same architecture as the bundled `glm4_moe` fixture (noaux_tc grouped routing with correction
bias, one shared expert, partial rotary, q/k norm, attention bias, first layer dense), at a width
where matmuls rather than Python dominate a step: hidden 1024, 8 routed experts of width 512.
"""

from __future__ import annotations

import numpy as np

from engine.config import GLM4_MOE, ModelConfig
from engine.checkpoint.hub_schema import expected_tensors
from engine.models.moe_decoder import MoEDecoder

WEIGHT_STD = 0.02  # the Hub configs' initializer_range


def synthetic_config(hidden: int = 1024, layers: int = 3, experts: int = 8, max_positions: int = 8192) -> ModelConfig:
    """GLM-4.5-Air proportions scaled down: head_dim 128, 4 query heads per kv head, layer 0 dense."""
    heads = hidden // 128
    return ModelConfig(
        architecture=GLM4_MOE, vocab_size=4096, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=max(1, heads // 4), head_dim=128, rotary_dim=64, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
        max_position_embeddings=max_positions, intermediate_size=2 * hidden, attention_bias=True,
        o_proj_bias=False, use_qk_norm=True, tie_word_embeddings=False, router="noaux_tc",
        moe_layers=tuple(range(1, layers)), num_experts=experts, top_k=2, moe_intermediate_size=hidden // 2,
        norm_topk_prob=True, n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1)


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Hub name -> float32 array for every tensor `cfg` needs: norms near 1, the rest N(0, 0.02)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_tensors(cfg).items():
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(WEIGHT_STD)
        weights[name] = values + np.float32(1.0) if name.endswith("norm.weight") else values
    return weights


def synthetic_model(cfg: ModelConfig, seed: int = 0) -> MoEDecoder:
    return MoEDecoder(cfg, random_weights(cfg, seed))
