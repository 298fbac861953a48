"""Cases that kill mutants of engine/config.py the other config cases let live (bench/mutation.md).

Mostly the contracts around the validators rather than their main branches: a string given for
an enum field becomes the member (the engine compares members with `is`), every refusal carries
the field it names in `ConfigError.field`, type checks refuse bools and non-integers, and the
boundary values the validators must accept are accepted. Expected values are written by hand.
"""

from __future__ import annotations

import pytest

from engine.config import (
    CaptureTiming,
    ConfigError,
    GraphConfig,
    GraphMode,
    ModelConfig,
    MoEForm,
    ParallelConfig,
    RouterKind,
    check_capture_sizes,
    default_decode_sizes,
)

# A small valid Qwen3-MoE-shaped model, written out (not read through engine/hf_config.py). Built
# inside each case, from strings, so that a mutant of the constructor is in force when it runs
# (module-level objects are built once, at collection, before mutmut switches a mutant on).
QWEN_FIELDS = dict(
    architecture="Qwen3MoeForCausalLM", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, rotary_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
    max_position_embeddings=128, intermediate_size=48, attention_bias=False, o_proj_bias=False,
    use_qk_norm=True, tie_word_embeddings=False, router="softmax_topk", moe_layers=(0, 1),
    num_experts=4, top_k=2, moe_intermediate_size=16, norm_topk_prob=True)
# The same shape as a GLM-4.5 model: noaux_tc routing with 2 groups of 2 experts.
GLM_FIELDS = {**QWEN_FIELDS, "architecture": "Glm4MoeForCausalLM", "router": "noaux_tc", "n_group": 2,
              "topk_group": 1}


def qwen(**changes) -> ModelConfig:
    return ModelConfig(**{**QWEN_FIELDS, **changes})


def glm(**changes) -> ModelConfig:
    return ModelConfig(**{**GLM_FIELDS, **changes})


def _refusal(build) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        build()
    return err.value


def test_enum_fields_given_as_strings_become_members():
    assert qwen().router is RouterKind.SOFTMAX_TOPK and glm().router is RouterKind.NOAUX_TC
    assert qwen(moe_form="sparse").moe_form is MoEForm.SPARSE
    assert qwen().moe_form is MoEForm.DENSE
    assert GraphConfig(capture="eager").capture is CaptureTiming.EAGER


def test_a_string_router_still_gets_its_own_checks():
    """noaux_tc given as a string is validated as noaux_tc: 2 groups of 2 experts cannot keep 3."""
    err = _refusal(lambda: glm(top_k=3))
    assert err.field == "top_k" and str(err).startswith("top_k=3 exceeds the 2 experts in topk_group=1 groups of 2")


def test_an_unknown_moe_form_is_refused_by_name():
    err = _refusal(lambda: qwen(moe_form="ragged"))
    assert err.field == "moe_form" and str(err) == "moe_form='ragged' is not one of dense, sparse"


def test_members_format_with_a_spec_like_their_value():
    assert f"{GraphMode.PIECEWISE:>11}|{RouterKind.NOAUX_TC:<9}|" == "  piecewise|noaux_tc |"


def test_an_unsupported_architecture_lists_the_supported_ones():
    err = _refusal(lambda: qwen(architecture="LlamaForCausalLM"))
    assert str(err) == ("architecture='LlamaForCausalLM' is not supported (supported: "
                        "Glm4MoeForCausalLM, Qwen3MoeForCausalLM)")


def test_softmax_top_k_may_take_every_expert_and_a_bad_one_is_named():
    assert qwen(top_k=4).top_k == 4
    err = _refusal(lambda: qwen(top_k=0))
    assert err.field == "top_k" and str(err) == "top_k=0 is not a positive integer"


@pytest.mark.parametrize("name, value, kind", [
    ("n_shared_experts", 1.5, "a non-negative integer"), ("n_shared_experts", True, "a non-negative integer"),
    ("num_mtp_layers", 2.0, "a non-negative integer"),
    ("rms_norm_eps", True, "a positive finite number"), ("rope_theta", "1e4", "a positive finite number"),
])
def test_bools_strings_and_non_integers_are_refused(name, value, kind):
    err = _refusal(lambda: qwen(**{name: value}))
    assert err.field == name and str(err) == f"{name}={value!r} is not {kind}"


def test_ep_may_be_one_at_any_tp_and_a_bad_ep_is_named():
    assert ParallelConfig(tp=2, ep=1).ep == 1 and ParallelConfig(tp=4, ep=4).ep == 4
    assert _refusal(lambda: ParallelConfig(tp=2, ep=3)).field == "ep"


@pytest.mark.parametrize("sizes, limit", [((), 8), ((0, 4), 8), ((8, 4), 8), ((4, 16), 8)])
def test_every_capture_size_refusal_carries_the_label(sizes, limit):
    err = _refusal(lambda: check_capture_sizes(sizes, limit, "decode_capture_sizes"))
    assert err.field == "decode_capture_sizes"


def test_the_default_decode_ladder_ends_at_64_sequences():
    assert default_decode_sizes() == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
