"""The seed failure of this project: a GLM MoE router that crashed (TypeError) when the checkpoint
had no `e_score_correction_bias`. Absent bias is a supported configuration and must route exactly
as an all-zero bias: through the MoE layer alone, and through the whole model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import paddle
from safetensors.numpy import load_file, save_file

from engine.checkpoint.loader import load_weights
from engine.dump import dump_arrays
from engine.hf_config import read_model_config
from engine.llm import LLM
from engine.models.moe_decoder import MoEDecoder
from fixtures.pytest_fixtures import checkpoint_dir
from verifier.compare import assert_equal
from verifier.dumps import compare_dumps

MOE_LAYER = 2  # glm4_moe's first MoE layer


def decoder(name: str) -> MoEDecoder:
    cfg = read_model_config(checkpoint_dir(name))
    return MoEDecoder(cfg, load_weights(checkpoint_dir(name), cfg))


def moe_outputs(model: MoEDecoder, weights, tokens: int = 24, real: int = 19):
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((tokens, model.cfg.hidden_size)).astype("float32"))
    out, ids, _ = model._moe(weights, x, paddle.to_tensor([real], dtype="int64"))
    return out.numpy(), ids.numpy()


def test_seed_regression_moe_layer_without_correction_bias():
    model = decoder("glm4_moe_nobias")
    absent = model.layers[MOE_LAYER].mlp
    assert absent.bias is None
    zeros = replace(absent, bias=paddle.zeros([model.cfg.num_experts], dtype="float32"))
    out_absent, ids_absent = moe_outputs(model, absent)
    out_zeros, ids_zeros = moe_outputs(model, zeros)
    assert_equal(ids_absent, ids_zeros, name="expert ids, bias None vs zeros")
    assert_equal(out_absent, out_zeros, name="MoE output, bias None vs zeros")
    assert (ids_absent[19:] == -1).all()


def test_seed_regression_bias_still_matters():
    """The check above is not vacuous: the real (non-zero) bias changes the routing."""
    model = decoder("glm4_moe")
    biased = model.layers[MOE_LAYER].mlp
    _, ids_biased = moe_outputs(model, biased)
    _, ids_unbiased = moe_outputs(model, replace(biased, bias=None))
    assert (np.sort(ids_biased, -1) != np.sort(ids_unbiased, -1)).any(-1).sum() > 0


def test_seed_regression_model_without_correction_bias(engine_for, prompts, copy_checkpoint):
    """The no-bias checkpoint loads, runs, and matches the same weights with an all-zero bias
    exactly: logits, tokens and routed experts, prefill and decode."""
    zero = copy_checkpoint("glm4_moe_nobias")
    tensors = load_file(zero / "model.safetensors")
    cfg = read_model_config(zero)
    for layer in cfg.moe_layers:
        tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = np.zeros(cfg.num_experts, np.float32)
    save_file(tensors, zero / "model.safetensors")
    with_zeros = LLM(zero)
    without = engine_for("glm4_moe_nobias")
    a = dump_arrays(with_zeros.generate(prompts, 8), cfg.moe_layers)
    b = dump_arrays(without.generate(prompts, 8), cfg.moe_layers)
    compare_dumps(a, b).assert_ok()  # exact
