"""The loader is strict: every error names the file and the tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from engine.checkpoint.hub_schema import Role, expected_tensors, layer_of, role
from engine.checkpoint.loader import CheckpointError, load_weights
from engine.hf_config import read_model_config
from fixtures.pytest_fixtures import CHECKPOINT_NAMES, checkpoint_dir

BIAS = "model.layers.2.mlp.gate.e_score_correction_bias"


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_bundled_checkpoints_load_completely(name):
    cfg = read_model_config(checkpoint_dir(name))
    weights = load_weights(checkpoint_dir(name), cfg)
    absent = set(expected_tensors(cfg)) - set(weights)
    assert absent == ({BIAS, BIAS.replace("layers.2", "layers.3")} if name == "glm4_moe_nobias" else set())
    assert all(w.dtype == np.float32 for w in weights.values())


@pytest.mark.parametrize("name, want", [
    ("model.embed_tokens.weight", Role("vocab")),
    ("lm_head.weight", Role("vocab")),
    ("model.layers.3.self_attn.q_proj.bias", Role("q_proj")),
    ("model.layers.3.self_attn.v_proj.weight", Role("kv_proj")),
    ("model.layers.3.self_attn.o_proj.weight", Role("o_proj")),
    ("model.layers.3.self_attn.o_proj.bias", None),  # added once, by rank 0: read whole
    ("model.layers.3.mlp.experts.12.down_proj.weight", Role("expert", "down", 12)),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", Role("shared_expert", "up")),
    ("model.layers.0.mlp.gate_proj.weight", Role("dense_mlp", "gate")),
    ("model.layers.3.mlp.gate.weight", None),  # the router: replicated
    ("model.layers.3.mlp.gate.e_score_correction_bias", None),
    ("model.norm.weight", None),
])
def test_the_schema_reads_a_hub_name_back_as_its_sharding_role(name, want):
    assert role(name) == want


def test_every_bundled_tensor_has_the_role_its_name_says():
    """Across the fixtures' names: projections and experts are sharded, norms and routers are not."""
    for name in CHECKPOINT_NAMES:
        for tensor in expected_tensors(read_model_config(checkpoint_dir(name))):
            sharded = tensor.endswith("_proj.weight") or "embed_tokens" in tensor or tensor == "lm_head.weight"
            sharded |= tensor.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
            assert (role(tensor) is not None) == sharded, tensor
            assert (layer_of(tensor) is None) == (not tensor.startswith("model.layers.")), tensor


def edit(model_dir, change):
    """Apply `change(tensors)` to a checkpoint copy's model.safetensors."""
    tensors = load_file(model_dir / "model.safetensors")
    change(tensors)
    save_file(tensors, model_dir / "model.safetensors")
    return model_dir


def load(model_dir):
    return load_weights(model_dir, read_model_config(model_dir))


def test_sharded_checkpoint_loads_the_same(copy_checkpoint):
    model = copy_checkpoint("glm4_moe")
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, model / shard)
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (model / "model.safetensors").unlink()
    sharded, single = load(model), load(checkpoint_dir("glm4_moe"))
    assert sharded.keys() == single.keys()
    assert all(np.array_equal(sharded[k], single[k]) for k in single)


def test_missing_shard_is_named(copy_checkpoint):
    model = copy_checkpoint("glm4_moe")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00009.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00009.safetensors"):
        load(model)


def test_missing_safetensors(copy_checkpoint):
    model = copy_checkpoint("glm4_moe")
    (model / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(model)


def test_truncated_safetensors(copy_checkpoint):
    model = copy_checkpoint("glm4_moe")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(model)


BAD_TENSORS = [
    ("missing", lambda t: t.pop("model.layers.2.mlp.experts.7.up_proj.weight"),
     "tensor model.layers.2.mlp.experts.7.up_proj.weight is missing"),
    ("unexpected", lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
     "unexpected tensor model.layers.0.mlp.extra.weight"),
    ("misshaped", lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}),
     r"tensor model.norm.weight has shape \[65\]; the config implies \[64\]"),
    ("nonfinite", lambda t: t["model.layers.1.self_attn.q_proj.weight"].__setitem__((3, 5), np.inf),
     r"tensor model.layers.1.self_attn.q_proj.weight has a non-finite value at index \(3, 5\)"),
    ("wrong_dtype", lambda t: t.update({BIAS: np.zeros(16, np.int32)}), f"tensor {BIAS} has dtype I32"),
]


@pytest.mark.parametrize("change,message", [b[1:] for b in BAD_TENSORS], ids=[b[0] for b in BAD_TENSORS])
def test_bad_tensor_is_named(copy_checkpoint, change, message):
    model = edit(copy_checkpoint("glm4_moe"), change)
    with pytest.raises(CheckpointError, match=message):
        load(model)


def test_half_precision_checkpoints_widen_exactly(copy_checkpoint):
    """Real GLM checkpoints are bfloat16; values representable in bf16 must load unchanged."""
    import paddle
    from safetensors.paddle import save_file as save_paddle

    model = copy_checkpoint("glm4_moe")
    tensors = load_file(model / "model.safetensors")
    as_bf16 = {k: paddle.to_tensor(v).astype("bfloat16") for k, v in tensors.items()}
    save_paddle(as_bf16, str(model / "model.safetensors"))
    loaded = load(model)  # every tensor but the skipped MTP layer's
    for name, value in loaded.items():
        assert np.array_equal(value, as_bf16[name].astype("float32").numpy()), name


def test_mtp_layers_are_skipped():
    """GLM-4.5 stores its multi-token-prediction layer after the decoder, and so does the fixture
    (layer 4 of 4 decoder layers); it is not part of the model."""
    stored = set(load_file(checkpoint_dir("glm4_moe") / "model.safetensors"))
    mtp = {name for name in stored if name.startswith("model.layers.4.")}
    assert "model.layers.4.eh_proj.weight" in mtp
    assert set(load(checkpoint_dir("glm4_moe"))) == stored - mtp


def test_tensor_parallel_rank_reads_only_its_share():
    """Rank 2 of 4 reads a quarter of each split tensor, the replicated ones whole, and under expert
    parallelism only its own experts (4 of 16)."""
    from engine.distributed import Partition

    cfg = read_model_config(checkpoint_dir("glm4_moe"))
    full = load(checkpoint_dir("glm4_moe"))
    for ep in (False, True):
        part = Partition(2, 4, expert_parallel=ep)
        mine = load_weights(checkpoint_dir("glm4_moe"), cfg, lambda name: part.tensor_slice(cfg, name))
        assert np.array_equal(mine["model.embed_tokens.weight"], full["model.embed_tokens.weight"][256:384])
        assert np.array_equal(mine["model.layers.1.self_attn.q_proj.weight"],
                              full["model.layers.1.self_attn.q_proj.weight"][64:96])  # query head 2
        assert np.array_equal(mine["model.layers.1.self_attn.k_proj.weight"],
                              full["model.layers.1.self_attn.k_proj.weight"][32:64])  # kv head 1, replicated
        assert np.array_equal(mine["model.layers.2.mlp.gate.weight"], full["model.layers.2.mlp.gate.weight"])
        experts = {int(n.split(".")[5]) for n in mine if ".mlp.experts." in n}
        assert experts == (set(range(8, 12)) if ep else set(range(16)))
        down = mine["model.layers.2.mlp.experts.9.down_proj.weight"]
        assert down.shape == ((64, 32) if ep else (64, 8))
