"""ModelConfig.from_hf: both Hub spellings, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from engine.config import ConfigError, EngineConfig, ModelConfig
from fixtures.pytest_fixtures import checkpoint_dir, rewrite_config


def test_glm_fields():
    cfg = ModelConfig.from_hf(checkpoint_dir("glm4_moe"))
    assert (cfg.router, cfg.moe_layers, cfg.num_experts, cfg.top_k) == ("noaux_tc", (1, 2), 16, 4)
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.n_shared_experts) == (4, 2, 2.5, 1)
    assert cfg.head_dim * cfg.num_heads != cfg.hidden_size
    assert cfg.rotary_dim == cfg.head_dim // 2 and cfg.use_qk_norm and cfg.attention_bias


def test_qwen_fields():
    cfg = ModelConfig.from_hf(checkpoint_dir("qwen3_moe"))
    assert (cfg.router, cfg.moe_layers, cfg.num_experts, cfg.top_k) == ("softmax_topk", (1, 2), 8, 2)
    assert cfg.rotary_dim == cfg.head_dim and cfg.use_qk_norm and cfg.n_shared_experts == 0


def test_glm_4x_spelling_equals_5x(copy_checkpoint):
    """transformers 4.x Hub files put rope_theta and partial_rotary_factor at the top level."""
    model = copy_checkpoint("glm4_moe")
    rope = json.loads((model / "config.json").read_text())["rope_parameters"]
    rewrite_config(model, rope_parameters=None, rope_theta=rope["rope_theta"],
                   partial_rotary_factor=rope["partial_rotary_factor"], n_routed_experts=None,
                   num_local_experts=16)
    assert ModelConfig.from_hf(model) == ModelConfig.from_hf(checkpoint_dir("glm4_moe"))


def test_qwen_5x_spelling_equals_4x(copy_checkpoint):
    model = copy_checkpoint("qwen3_moe")
    rewrite_config(model, rope_theta=None, num_experts=None, num_local_experts=8,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert ModelConfig.from_hf(model) == ModelConfig.from_hf(checkpoint_dir("qwen3_moe"))


def test_qwen_sparse_step_and_dense_layers(copy_checkpoint):
    model = copy_checkpoint("qwen3_moe")
    rewrite_config(model, decoder_sparse_step=2, mlp_only_layers=[])
    assert ModelConfig.from_hf(model).moe_layers == (1,)


BAD_CONFIGS = [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"architectures": None}, "architectures"),
    ({"hidden_size": None}, "hidden_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 5}, "topk_group"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"rope_theta": 500000.0}, "rope_theta"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"use_qk_norm": "yes"}, "use_qk_norm"),
]


@pytest.mark.parametrize("changes,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_field_is_named(copy_checkpoint, changes, field):
    model = copy_checkpoint("glm4_moe")
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=field) as err:
        ModelConfig.from_hf(model)
    assert str(model / "config.json") in str(err.value)


def test_malformed_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def test_engine_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=0)
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        EngineConfig(num_kv_blocks=-1)
