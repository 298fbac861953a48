"""Cases that kill mutants of engine/hf_config.py's MoE field readers (bench/mutation.md).

The fixtures spell out every MoE key, so a wrong default for an absent key, a boundary value
refused, or a layer rule off by one went unseen: the "field silently read wrong" class of issue 12.
Each case parses a small hand-written config.json dict. Defaults are transformers 5.24's
(Glm4MoeConfig: first_k_dense_replace 1, num_experts_per_tok 8, norm_topk_prob true, n_group 1,
topk_group 1, routed_scaling_factor 1.0, n_shared_experts 1, num_nextn_predict_layers 1,
use_qk_norm false, rms_norm_eps 1e-5, rope_theta 10000, partial_rotary_factor 0.5; Qwen3MoeConfig:
decoder_sparse_step 1, num_experts_per_tok 8, norm_topk_prob false, mlp_only_layers [],
rms_norm_eps 1e-6, rope_theta 10000, no partial rotary; both: attention_bias and
tie_word_embeddings false, head_dim hidden_size // num_attention_heads; num_key_value_heads 8 for
GLM and 4 for Qwen (not the query head count); 128 routed experts for both). The sparse-layer rule
is transformers' Qwen3-MoE one: layer i is sparse when it is not in mlp_only_layers and
(i + 1) % decoder_sparse_step == 0.
"""

from __future__ import annotations

import pytest

from engine.config import ConfigError
from engine.hf_config import parse

_COMMON = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
           "max_position_embeddings": 128, "intermediate_size": 48, "moe_intermediate_size": 16}


def glm(**keys):
    """A 4-layer GLM-4.5-shaped config with 8 routed experts; `None` drops a key."""
    raw = {"architectures": ["Glm4MoeForCausalLM"], **_COMMON, "num_hidden_layers": 4,
           "n_routed_experts": 8, "first_k_dense_replace": 1, "num_experts_per_tok": 2, **keys}
    return parse({k: v for k, v in raw.items() if v is not None})


def qwen(**keys):
    """A 6-layer Qwen3-MoE-shaped config with 8 experts; `None` drops a key."""
    raw = {"architectures": ["Qwen3MoeForCausalLM"], **_COMMON, "num_hidden_layers": 6, "num_experts": 8,
           "num_experts_per_tok": 2, **keys}
    return parse({k: v for k, v in raw.items() if v is not None})


def _refusal(build, field: str) -> str:
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(f"field '{field}'"), str(err.value)
    return str(err.value)


@pytest.mark.parametrize("first_dense, moe_layers", [(None, (1, 2, 3)), (0, (0, 1, 2, 3)), (4, ())])
def test_glm_first_k_dense_replace_default_and_both_ends(first_dense, moe_layers):
    assert glm(first_k_dense_replace=first_dense).moe_layers == moe_layers


def test_glm_first_k_dense_replace_beyond_the_layers_is_named():
    message = _refusal(lambda: glm(first_k_dense_replace=5), "first_k_dense_replace")
    assert message == "field 'first_k_dense_replace': 5 is not a layer count within num_hidden_layers=4"


@pytest.mark.parametrize("build", [glm, qwen], ids=["glm", "qwen"])
def test_zero_routed_experts_is_a_dense_model(build):
    cfg = build(n_routed_experts=0, num_experts=0)
    assert (cfg.moe_layers, cfg.num_experts) == ((), 0)


@pytest.mark.parametrize("build, norm", [(glm, True), (qwen, False)], ids=["glm", "qwen"])
def test_absent_top_k_and_norm_take_transformers_defaults(build, norm):
    cfg = build(num_experts_per_tok=None, norm_topk_prob=None)
    assert cfg.top_k == 8 and cfg.norm_topk_prob is norm


@pytest.mark.parametrize("step, dense_only, moe_layers", [
    (None, None, (0, 1, 2, 3, 4, 5)), (3, None, (2, 5)), (2, [3], (1, 5)), (1, [0, 5], (1, 2, 3, 4)),
])
def test_qwen_sparse_layers_follow_transformers_rule(step, dense_only, moe_layers):
    assert qwen(decoder_sparse_step=step, mlp_only_layers=dense_only).moe_layers == moe_layers


def test_qwen_sparse_step_zero_is_named():
    message = _refusal(lambda: qwen(decoder_sparse_step=0), "decoder_sparse_step")
    assert message == "field 'decoder_sparse_step' must be a positive integer, got 0"


@pytest.mark.parametrize("dense_only", [[6], [-1], [1, 7], ["1"], [1.0]])
def test_qwen_mlp_only_layers_outside_the_model_are_named(dense_only):
    message = _refusal(lambda: qwen(mlp_only_layers=dense_only), "mlp_only_layers")
    assert message == (f"field 'mlp_only_layers' must be a list of layer indices below num_hidden_layers=6, "
                       f"got {dense_only!r}")


def test_glm_absent_keys_take_transformers_defaults():
    cfg = glm(n_group=None, topk_group=None, routed_scaling_factor=None, n_shared_experts=None,
              num_nextn_predict_layers=None, use_qk_norm=None, rms_norm_eps=None, attention_bias=None,
              tie_word_embeddings=None)
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == (1, 1, 1.0)
    assert (cfg.n_shared_experts, cfg.num_mtp_layers, cfg.rms_norm_eps) == (1, 1, 1e-5)
    assert (cfg.use_qk_norm, cfg.attention_bias, cfg.o_proj_bias, cfg.tie_word_embeddings) == (False,) * 4
    assert (cfg.head_dim, cfg.rotary_dim, cfg.rope_theta) == (8, 4, 10000.0)


def test_qwen_absent_keys_take_transformers_defaults():
    cfg = qwen(rms_norm_eps=None, attention_bias=None, tie_word_embeddings=None)
    assert (cfg.rms_norm_eps, cfg.attention_bias, cfg.o_proj_bias, cfg.tie_word_embeddings) == (1e-6,) + (False,) * 3
    assert (cfg.head_dim, cfg.rotary_dim, cfg.rope_theta, cfg.use_qk_norm) == (8, 8, 10000.0, True)


def test_absent_head_and_expert_counts_take_transformers_defaults():
    eight_heads = dict(num_key_value_heads=None, num_attention_heads=8, head_dim=4)
    assert (glm(**eight_heads).num_kv_heads, qwen(**eight_heads).num_kv_heads) == (8, 4)  # not the 8 query heads
    assert glm(n_routed_experts=None).num_experts == qwen(num_experts=None).num_experts == 128
    assert glm(n_routed_experts=None).moe_layers == (1, 2, 3)
    with pytest.raises(ConfigError) as refused:  # GLM's default 8 cannot serve 4 query heads: said so
        glm(num_key_value_heads=None)
    assert str(refused.value) == ("field 'num_key_value_heads' is absent and transformers' default of 8 "
                                  "does not divide num_attention_heads=4")


def test_explicit_values_are_read_not_defaulted():
    cfg = glm(n_shared_experts=0, num_nextn_predict_layers=0, use_qk_norm=True, tie_word_embeddings=True,
              attention_bias=True, head_dim=16,
              rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 0.75})
    assert (cfg.n_shared_experts, cfg.num_mtp_layers, cfg.use_qk_norm, cfg.tie_word_embeddings) == (0, 0, True, True)
    assert (cfg.attention_bias, cfg.o_proj_bias) == (True, False)  # GLM's output projection never has a bias
    assert (cfg.head_dim, cfg.rotary_dim, cfg.rope_theta) == (16, 12, 500.0)
    assert qwen(attention_bias=True).o_proj_bias is True  # Qwen3 ties it to attention_bias


@pytest.mark.parametrize("keys, field, message", [
    ({"rope_parameters": [10000.0]}, "rope_parameters", "field 'rope_parameters' must be an object, got [10000.0]"),
    ({"rope_parameters": {"type": "yarn"}}, "rope_parameters.rope_type",
     "field 'rope_parameters.rope_type': 'yarn' is not supported (only 'default')"),
    ({"rope_parameters": {"rope_theta": "1e4"}}, "rope_parameters.rope_theta",
     "field 'rope_parameters.rope_theta' must be a number, got '1e4'"),
    ({"partial_rotary_factor": 0.0}, "partial_rotary_factor",
     "field 'partial_rotary_factor' must be in (0, 1], got 0.0"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor",
     "field 'partial_rotary_factor' must be in (0, 1], got 1.5"),
    ({"hidden_size": 30}, "head_dim",
     "field 'head_dim' is absent and hidden_size=30 is not divisible by num_attention_heads=4"),
])
def test_rope_and_head_refusals_name_the_key(keys, field, message):
    assert _refusal(lambda: qwen(**keys), field) == message


def test_a_fractional_rotary_width_is_named():
    with pytest.raises(ConfigError) as err:
        qwen(partial_rotary_factor=0.1875)
    assert err.value.field == "partial_rotary_factor"
    assert str(err.value) == ("partial_rotary_factor=0.1875 gives a rotary width of 1.5 channels of head_dim=8: "
                              "it must be a whole number")
