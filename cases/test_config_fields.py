"""Every config.json field the parser reads is live: changing its value changes what the engine
produces, or gets the checkpoint refused with a message that names what the value implies.

A field read from one Hub spelling and not the other (transformers 4.x vs 5.x) would fall back to
its default without a sound, and goldens made with a fixture whose value equals the default would
not notice. So each field that has two spellings is changed in each spelling, on a copy of the
fixture rewritten into that spelling.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.errors import UserError
from engine.llm import LLM, Prompt
from fixtures.pytest_fixtures import checkpoint_dir

PROMPT = [Prompt(tuple(range(1, 12)), "p")]
OWN_EXPERT_KEY = {"glm4_moe": "n_routed_experts", "qwen3_moe": "num_experts"}
ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
SPELLINGS = ("4.x", "5.x")


def outputs(model_dir, faults) -> np.ndarray:
    """Prompt logits and the logits of two greedy steps, [T + 2, V] (covers prefill and decode),
    with the run's failpoints planted (the comparisons hold with or without them)."""
    out = LLM(model_dir, EngineConfig(faults=faults)).generate(PROMPT, 3)[0]
    return np.concatenate([out.logits(), np.stack(out.greedy_logits[1:])])


@pytest.fixture(scope="module")
def baseline(faults):
    cache: dict = {}
    return lambda name: cache.setdefault(name, outputs(checkpoint_dir(name), faults))


def respell(raw: dict, name: str, spelling: str) -> dict:
    """The same configuration in the 4.x spelling (rope values and the expert count under the
    architecture's own keys at the top level) or the 5.x one (rope_parameters, num_local_experts)."""
    raw = dict(raw)
    rope = dict(raw.pop("rope_parameters", None) or {"rope_type": "default"})
    values = {key: rope.pop(key, raw.pop(key, None)) for key in ROPE_KEYS}
    experts = raw.pop(OWN_EXPERT_KEY[name], None) or raw.pop("num_local_experts", None)
    raw.pop("num_local_experts", None)
    present = {key: value for key, value in values.items() if value is not None}
    if spelling == "4.x":
        raw.update(present, **{OWN_EXPERT_KEY[name]: experts})
    else:
        raw.update(rope_parameters={**rope, **present}, num_local_experts=experts)
    return raw


def set_field(raw: dict, name: str, spelling: str, key: str, value) -> None:
    """Set `key` where `spelling` keeps it."""
    if key in ROPE_KEYS and spelling == "5.x":
        raw["rope_parameters"][key] = value
    elif key == "num_experts":
        raw[OWN_EXPERT_KEY[name] if spelling == "4.x" else "num_local_experts"] = value
    else:
        raw[key] = value


def variant(copy_checkpoint, name: str, spelling: str, changes: dict):
    model = copy_checkpoint(name)
    raw = respell(json.loads((model / "config.json").read_text()), name, spelling)
    for key, value in changes.items():
        set_field(raw, name, spelling, key, value)
    (model / "config.json").write_text(json.dumps(raw, indent=1))
    return model


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("name", ["glm4_moe", "qwen3_moe"])
def test_both_spellings_give_the_fixture_outputs(copy_checkpoint, baseline, faults, name, spelling):
    assert np.array_equal(outputs(variant(copy_checkpoint, name, spelling, {}), faults), baseline(name))


# Fields with two spellings: changed in each. "changes" means the outputs must differ from the
# fixture's; any other entry is text the refusal must contain.
TWO_SPELLINGS = [
    ("glm4_moe", "rope_theta", 10000.0, "changes"),
    ("glm4_moe", "partial_rotary_factor", 0.5, "changes"),
    ("glm4_moe", "num_experts", 8, "unexpected tensor model.layers.2.mlp.experts.10.down_proj.weight (and 47 more)"),
    ("qwen3_moe", "rope_theta", 10000.0, "changes"),
    ("qwen3_moe", "partial_rotary_factor", 0.5, "changes"),
    ("qwen3_moe", "num_experts", 4, "unexpected tensor model.layers.1.mlp.experts.4.down_proj.weight (and 23 more)"),
]

# Fields with one spelling, changed in the fixture's own spelling.
ONE_SPELLING = [
    ("glm4_moe", "rms_norm_eps", 1e-5, "changes"),
    ("glm4_moe", "num_experts_per_tok", 2, "changes"),
    ("glm4_moe", "norm_topk_prob", False, "changes"),
    ("glm4_moe", "n_group", 2, "changes"),
    ("glm4_moe", "topk_group", 3, "changes"),
    ("glm4_moe", "routed_scaling_factor", 1.0, "changes"),
    ("glm4_moe", "num_hidden_layers", 3, "unexpected tensor model.layers.4.eh_proj.weight (and 3 more)"),
    ("glm4_moe", "max_position_embeddings", 8, "11 prompt tokens + 3 new tokens exceed the model's 8 positions"),
    ("glm4_moe", "n_shared_experts", 1, "shared_experts.down_proj.weight has shape [64, 64]; the config implies "
                                        "[64, 32]"),
    ("glm4_moe", "first_k_dense_replace", 1, "tensor model.layers.1.mlp.experts.0.down_proj.weight is missing"),
    ("glm4_moe", "attention_bias", False, "unexpected tensor model.layers.0.self_attn.k_proj.bias"),
    ("glm4_moe", "use_qk_norm", False, "unexpected tensor model.layers.0.self_attn.k_norm.weight"),
    ("glm4_moe", "tie_word_embeddings", True, "unexpected tensor lm_head.weight"),
    ("glm4_moe", "head_dim", 16, "k_norm.weight has shape [32]; the config implies [16]"),
    ("glm4_moe", "num_key_value_heads", 4, "k_proj.bias has shape [64]; the config implies [128]"),
    ("glm4_moe", "num_attention_heads", 2, "o_proj.weight has shape [64, 128]; the config implies [64, 64]"),
    ("glm4_moe", "hidden_size", 32, "lm_head.weight has shape [512, 64]; the config implies [512, 32]"),
    ("glm4_moe", "vocab_size", 256, "lm_head.weight has shape [512, 64]; the config implies [256, 64]"),
    ("glm4_moe", "intermediate_size", 64, "mlp.down_proj.weight has shape [64, 128]; the config implies [64, 64]"),
    ("glm4_moe", "moe_intermediate_size", 16, "experts.0.down_proj.weight has shape [64, 32]; the config implies "
                                              "[64, 16]"),
    ("glm4_moe", "hidden_act", "gelu", "field 'hidden_act': 'gelu' is not supported"),
    ("glm4_moe", "rope_scaling", {"rope_type": "linear", "factor": 2.0}, "field 'rope_scaling'"),
    ("glm4_moe", "architectures", ["Qwen3MoeForCausalLM"], "model.layers.0.mlp.experts.0.down_proj.weight is missing"),
    ("qwen3_moe", "rms_norm_eps", 1e-6, "changes"),
    ("qwen3_moe", "num_experts_per_tok", 3, "changes"),
    ("qwen3_moe", "norm_topk_prob", False, "changes"),
    ("qwen3_moe", "max_position_embeddings", 8, "11 prompt tokens + 3 new tokens exceed the model's 8 positions"),
    ("qwen3_moe", "decoder_sparse_step", 2, "tensor model.layers.2.mlp.down_proj.weight is missing"),
    ("qwen3_moe", "mlp_only_layers", [], "tensor model.layers.0.mlp.experts.0.down_proj.weight is missing"),
    ("qwen3_moe", "attention_bias", False, "unexpected tensor model.layers.0.self_attn.k_proj.bias"),
    ("qwen3_moe", "tie_word_embeddings", False, "tensor lm_head.weight is missing"),
    ("qwen3_moe", "use_sliding_window", True, "field 'use_sliding_window'"),
]
OWN_SPELLING = {"glm4_moe": "5.x", "qwen3_moe": "4.x"}
CASES = [(n, s, k, v, e) for n, k, v, e in TWO_SPELLINGS for s in SPELLINGS] + \
        [(n, OWN_SPELLING[n], k, v, e) for n, k, v, e in ONE_SPELLING]


@pytest.mark.parametrize("name,spelling,key,value,expect", CASES, ids=[f"{n}-{s}-{k}" for n, s, k, _, _ in CASES])
def test_every_field_read_is_live(copy_checkpoint, baseline, faults, name, spelling, key, value, expect):
    model = variant(copy_checkpoint, name, spelling, {key: value})
    if expect == "changes":
        assert not np.array_equal(outputs(model, faults), baseline(name)), f"{key}={value!r} ({spelling}) changed nothing"
    else:
        with pytest.raises(UserError, match=re.escape(expect)):
            outputs(model, faults)


def test_rope_type_other_than_default_is_refused(copy_checkpoint, faults):
    model = variant(copy_checkpoint, "glm4_moe", "5.x", {})
    raw = json.loads((model / "config.json").read_text())
    raw["rope_parameters"]["rope_type"] = "yarn"
    (model / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=re.escape("field 'rope_parameters.rope_type': 'yarn' is not supported")):
        outputs(model, faults)


@pytest.mark.parametrize("mtp_layers,loads", [(2, True), (0, False)])
def test_mtp_layer_count_is_live(copy_checkpoint, baseline, faults, mtp_layers, loads):
    """num_nextn_predict_layers says which stored layers after the decoder are GLM's MTP layers,
    which the engine skips. The fixture stores one (layer 4, after 4 decoder layers): counted as
    part of two it is still skipped; with none it is refused."""
    model = variant(copy_checkpoint, "glm4_moe", "5.x", {"num_nextn_predict_layers": mtp_layers})
    if loads:
        assert np.array_equal(outputs(model, faults), baseline("glm4_moe"))
    else:
        with pytest.raises(UserError, match=re.escape("unexpected tensor model.layers.4.eh_proj.weight (and 3 more)")):
            outputs(model, faults)
