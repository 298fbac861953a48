"""read_model_config (engine/hf_config.py): both Hub spellings, and errors that name the field."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import paddle
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.config import (
    CaptureTiming,
    ConfigError,
    EngineConfig,
    GraphBackend,
    GraphConfig,
    GraphMode,
    ParallelConfig,
)
from engine.hf_config import read_model_config
from engine.moe import router
from fixtures.pytest_fixtures import checkpoint_dir, rewrite_config


def test_glm_fields():
    cfg = read_model_config(checkpoint_dir("glm4_moe"))
    assert (cfg.router, cfg.moe_layers, cfg.num_experts, cfg.top_k) == ("noaux_tc", (2, 3), 16, 4)
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.n_shared_experts) == (4, 2, 2.5, 2)
    assert cfg.head_dim * cfg.num_heads != cfg.hidden_size
    assert cfg.rotary_dim == cfg.head_dim // 4 and cfg.use_qk_norm and cfg.attention_bias


def test_qwen_fields():
    cfg = read_model_config(checkpoint_dir("qwen3_moe"))
    assert (cfg.router, cfg.moe_layers, cfg.num_experts, cfg.top_k) == ("softmax_topk", (1, 2), 8, 2)
    assert cfg.rotary_dim == cfg.head_dim and cfg.use_qk_norm and cfg.n_shared_experts == 0


def test_glm_4x_spelling_equals_5x(copy_checkpoint):
    """transformers 4.x Hub files put rope_theta and partial_rotary_factor at the top level."""
    model = copy_checkpoint("glm4_moe")
    rope = json.loads((model / "config.json").read_text())["rope_parameters"]
    rewrite_config(model, rope_parameters=None, rope_theta=rope["rope_theta"],
                   partial_rotary_factor=rope["partial_rotary_factor"], n_routed_experts=None,
                   num_local_experts=16)
    assert read_model_config(model) == read_model_config(checkpoint_dir("glm4_moe"))


def test_qwen_5x_spelling_equals_4x(copy_checkpoint):
    model = copy_checkpoint("qwen3_moe")
    rewrite_config(model, rope_theta=None, num_experts=None, num_local_experts=8,
                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert read_model_config(model) == read_model_config(checkpoint_dir("qwen3_moe"))


def test_qwen_sparse_step_and_dense_layers(copy_checkpoint):
    model = copy_checkpoint("qwen3_moe")
    rewrite_config(model, decoder_sparse_step=2, mlp_only_layers=[])
    assert read_model_config(model).moe_layers == (1,)


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
        read_model_config(model)
    assert str(model / "config.json") in str(err.value)


def test_malformed_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_model_config(tmp_path)


def test_engine_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=0)
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        EngineConfig(num_kv_blocks=-1)


# ---------------------------------------------------------------------------------------------
# The one validator: every value it refuses, named with the field and the value

GLM = read_model_config(checkpoint_dir("glm4_moe"))
QWEN = read_model_config(checkpoint_dir("qwen3_moe"))
BASES = {"glm": GLM, "qwen": QWEN}

MODEL_REFUSALS = [
    ("glm", dict(architecture="LlamaForCausalLM"), "architecture='LlamaForCausalLM' is not supported"),
    ("glm", dict(router="topk"), "router='topk' is not one of noaux_tc, softmax_topk"),
    ("glm", dict(vocab_size=0), "vocab_size=0 is not a positive integer"),
    ("glm", dict(hidden_size=-64), "hidden_size=-64 is not a positive integer"),
    ("glm", dict(num_layers=True), "num_layers=True is not a positive integer"),
    ("glm", dict(num_heads=0), "num_heads=0 is not a positive integer"),
    ("glm", dict(num_kv_heads=3), "num_kv_heads=3 does not divide num_heads=4"),
    ("glm", dict(head_dim=32.0), "head_dim=32.0 is not a positive integer"),
    ("glm", dict(max_position_embeddings=0), "max_position_embeddings=0 is not a positive integer"),
    ("glm", dict(intermediate_size=0), "intermediate_size=0 is not a positive integer"),
    ("glm", dict(rotary_dim=0), "rotary_dim=0 is not a positive integer"),
    ("glm", dict(rotary_dim=15), "rotary_dim=15 (head_dim * partial_rotary_factor) must be even"),
    ("glm", dict(rotary_dim=34), "rotary_dim=34 (head_dim * partial_rotary_factor) must be even and within "
                                 "head_dim=32"),
    ("glm", dict(rope_theta=0.0), "rope_theta=0.0 is not a positive finite number"),
    ("glm", dict(rope_theta=float("inf")), "rope_theta=inf is not a positive finite number"),
    ("glm", dict(rms_norm_eps=-1e-6), "rms_norm_eps=-1e-06 is not a positive finite number"),
    ("glm", dict(rms_norm_eps=float("nan")), "rms_norm_eps=nan is not a positive finite number"),
    ("glm", dict(n_shared_experts=-1), "n_shared_experts=-1 is not a non-negative integer"),
    ("glm", dict(num_mtp_layers=-1), "num_mtp_layers=-1 is not a non-negative integer"),
    ("glm", dict(moe_layers=(2, 1)), "moe_layers=(2, 1) must be sorted, unique layer indices below num_layers=4"),
    ("glm", dict(moe_layers=(1, 1)), "moe_layers=(1, 1) must be sorted"),
    ("glm", dict(moe_layers=(1, 4)), "moe_layers=(1, 4) must be sorted"),
    ("glm", dict(moe_intermediate_size=0), "moe_intermediate_size=0 is not a positive integer"),
    ("glm", dict(routed_scaling_factor=0.0), "routed_scaling_factor=0.0 is not a positive finite number"),
    ("glm", dict(num_experts=0), "num_experts=0 is not a positive integer"),
    ("glm", dict(top_k=0), "top_k=0 is not a positive integer"),
    ("glm", dict(n_group=0), "n_group=0 is not a positive integer"),
    ("glm", dict(topk_group=-2), "topk_group=-2 is not a positive integer"),
    ("glm", dict(n_group=3), "n_group=3 does not divide the 16 routed experts"),
    ("glm", dict(n_group=16, topk_group=4), "n_group=16 splits the 16 routed experts into groups of 1"),
    ("glm", dict(topk_group=5), "topk_group=5 exceeds n_group=4"),
    ("glm", dict(top_k=9), "top_k=9 exceeds the 8 experts in topk_group=2 groups of 4"),
    ("qwen", dict(top_k=9), "top_k=9 exceeds the 8 routed experts"),
    ("qwen", dict(num_experts=-8), "num_experts=-8 is not a positive integer"),
]


@pytest.mark.parametrize("base,change,message", MODEL_REFUSALS, ids=[m.split(" ")[0] for _, _, m in MODEL_REFUSALS])
def test_model_validator_names_field_and_value(base, change, message):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(BASES[base], **change)
    assert str(err.value).startswith(message)
    assert err.value.field == message.split("=")[0]


ENGINE_REFUSALS = [
    (lambda: ParallelConfig(tp=0), "tp=0 is not a positive integer"),
    (lambda: ParallelConfig(tp=2, ep=3), "ep=3 must be 1 or equal to tp=2"),
    (lambda: ParallelConfig(fused_allreduce_max_tokens=-1), "fused_allreduce_max_tokens=-1 is not a positive integer"),
    (lambda: GraphConfig(mode="whole"), "graph.mode='whole' is not one of eager, piecewise, full_and_piecewise"),
    (lambda: GraphConfig(backend="tensorrt"), "graph.backend='tensorrt' is not one of auto, static, cudagraph"),
    (lambda: GraphConfig(capture="never"), "graph.capture='never' is not one of lazy, eager"),
    (lambda: EngineConfig(max_num_batched_tokens=0), "max_num_batched_tokens=0 is not a positive integer"),
    (lambda: EngineConfig(max_num_seqs=0), "max_num_seqs=0 is not a positive integer"),
    (lambda: EngineConfig(block_size=0), "block_size=0 is not a positive integer"),
    (lambda: EngineConfig(num_kv_blocks=-1), "num_kv_blocks=-1 is not a positive integer"),
    (lambda: EngineConfig(max_model_len=0), "max_model_len=0 is not a positive integer"),
    (lambda: EngineConfig(graph=GraphConfig(prefill_capture_sizes=(8, 4))),
     "prefill_capture_sizes: must be sorted and unique, but 8 comes before 4"),
    (lambda: EngineConfig(max_num_batched_tokens=64, graph=GraphConfig(decode_capture_sizes=(0, 4))),
     "decode_capture_sizes: 0 is not a positive integer"),
    (lambda: EngineConfig(max_num_batched_tokens=64, graph=GraphConfig(mode="piecewise", prefill_capture_sizes=(128,))),
     "prefill_capture_sizes: largest size 128 exceeds max_num_batched_tokens=64"),
]


@pytest.mark.parametrize("build,message", ENGINE_REFUSALS, ids=[m.split(" ")[0] for _, m in ENGINE_REFUSALS])
def test_engine_validator_names_field_and_value(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(message)


def test_graph_config_takes_strings_or_members():
    config = GraphConfig(mode="piecewise", backend="static", capture="eager")
    assert (config.mode, config.backend, config.capture) == (GraphMode.PIECEWISE, GraphBackend.STATIC,
                                                             CaptureTiming.EAGER)
    assert type(config.mode) is GraphMode and type(config.backend) is GraphBackend
    assert config == GraphConfig(mode=GraphMode.PIECEWISE, backend=GraphBackend.STATIC, capture=CaptureTiming.EAGER)
    # Other modules and files spell the values as strings; the members must read the same.
    assert f"{config.mode}/{config.backend}" == "piecewise/static" and {"piecewise": 1}[config.mode] == 1


def test_capture_sizes_are_derived_at_construction():
    """Defaults cut to the token budget (prefill) and to max_num_seqs (decode), worked out by hand."""
    engine = EngineConfig(max_num_batched_tokens=100, max_num_seqs=10, graph=GraphConfig(mode="piecewise"))
    assert engine.capture_sizes.prefill == (4, 8, 12, 16, 20, 24, 28, 32, 48, 64, 80, 96)
    assert engine.capture_sizes.decode == (1, 2, 4, 8, 10)
    given = EngineConfig(graph=GraphConfig(prefill_capture_sizes=(16, 512), decode_capture_sizes=(3,)))
    assert (given.capture_sizes.prefill, given.capture_sizes.decode) == ((16, 512), (3,))


def test_max_len_is_the_engine_limit_or_the_model_positions():
    assert EngineConfig().max_len(GLM) == 512
    assert EngineConfig(max_model_len=100).max_len(GLM) == 100


@settings(max_examples=60, deadline=None)
@given(num_experts=st.integers(1, 24), top_k=st.integers(1, 8), n_group=st.integers(1, 24),
       topk_group=st.integers(1, 8))
@example(num_experts=16, top_k=4, n_group=16, topk_group=4)  # the drift: singleton groups
def test_a_grouping_the_config_accepts_is_one_the_router_runs(num_experts, top_k, n_group, topk_group):
    """The router never meets a grouping that loaded: accepted configs route, refused ones are
    refused by the router with the same message."""
    change = dict(num_experts=num_experts, top_k=top_k, n_group=n_group, topk_group=topk_group)
    try:
        dataclasses.replace(GLM, **change)
    except ConfigError as refused:
        with pytest.raises(ValueError) as err:
            router.validate_grouping(num_experts, top_k, n_group, topk_group)
        assert str(err.value) == str(refused)
        return
    logits = paddle.to_tensor(np.linspace(-2, 2, 3 * num_experts, dtype=np.float32).reshape(3, num_experts))
    ids, _ = router.noaux_tc(logits, None, top_k=top_k, n_group=n_group, topk_group=topk_group,
                             norm_topk_prob=True, routed_scaling_factor=1.0)
    assert ids.shape == [3, top_k] and int(ids.min()) >= 0 and int(ids.max()) < num_experts
