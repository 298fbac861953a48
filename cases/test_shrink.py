"""`python -m verifier shrink`: a big sharded checkpoint (fixtures/big_checkpoint.py, both families,
both config spellings) cut to a small one. The expected config, layer map, expert map and widths
are an oracle table written out here by hand, never computed by verifier/shrink*.py; each small
tensor is checked element by element against the big tensor read independently with safetensors;
the result loads in the engine's strict loader and generates the same in piecewise graphs as eagerly.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from fixtures.big_checkpoint import build_big
from verifier.__main__ import main as verifier_main
from verifier.shrink import shrink
from verifier.shrink_plan import Options, ShrinkError

pytestmark = pytest.mark.gate_area("verifier")

OPTIONS = Options(layers=3, experts=8, hidden=64, heads=4, intermediate=128, moe_intermediate=16)
ARGS = ["--layers", "3", "--experts", "8", "--hidden", "64", "--heads", "4", "--intermediate", "128",
        "--moe-intermediate", "16"]


@dataclass(frozen=True)
class Oracle:
    """What shrinking a big fixture with OPTIONS must give (big sizes: fixtures/big_checkpoint.py)."""

    changed: dict  # config key -> the small value; every other key of the big config is unchanged
    kept: tuple  # keys that must be present in the big config and copied as written
    layers: dict  # big layer -> small layer (MTP layers included)
    experts: dict  # big expert -> small expert
    big: dict  # axis -> big size
    small: dict  # axis -> small size


COMMON_KEPT = ("model_type", "architectures", "head_dim", "vocab_size", "num_experts_per_tok", "norm_topk_prob",
               "tie_word_embeddings", "attention_bias", "rms_norm_eps", "max_position_embeddings", "hidden_act")
SPELLING_KEPT = {"4.x": ("rope_theta", "torch_dtype", "rope_scaling"), "5.x": ("rope_parameters", "dtype")}
ORACLES = {
    # 5 layers (2 dense, 3 MoE) + 1 MTP; 32 experts in 4 groups of 8 -> the first 2 of each group
    "glm": Oracle(
        changed={"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128, "moe_intermediate_size": 16, "n_routed_experts": 8, "n_group": 4,
                 "topk_group": 2, "first_k_dense_replace": 1},
        kept=COMMON_KEPT + ("n_shared_experts", "routed_scaling_factor", "num_nextn_predict_layers", "use_qk_norm"),
        layers={0: 0, 2: 1, 3: 2, 5: 3}, experts={0: 0, 1: 1, 8: 2, 9: 3, 16: 4, 17: 5, 24: 6, 25: 7},
        big=dict(H=128, Q=256, KV=128, I=256, M=32, S=64), small=dict(H=64, Q=128, KV=64, I=128, M=16, S=32)),
    # 4 layers (layer 0 dense); 16 experts, one group; 4 query heads per KV head
    "qwen": Oracle(
        changed={"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
                 "intermediate_size": 128, "moe_intermediate_size": 16, "num_experts": 8, "mlp_only_layers": [0],
                 "max_window_layers": 3},
        kept=COMMON_KEPT + ("decoder_sparse_step",),
        layers={0: 0, 1: 1, 2: 2}, experts={e: e for e in range(8)},
        big=dict(H=128, Q=256, KV=64, I=256, M=32, S=0), small=dict(H=64, Q=128, KV=32, I=128, M=16, S=0)),
}
BUILDS = [("glm", "4.x", True), ("glm", "5.x", True), ("glm", "5.x", False), ("qwen", "4.x", True),
          ("qwen", "5.x", True)]


def build_id(build) -> str:
    family, spelling, bias = build
    return f"{family}-{spelling}" + ("" if bias else "-nobias")


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """shrunk(build) -> (big dir, small dir), each built once per module."""
    cache: dict = {}

    def get(build):
        if build not in cache:
            root = tmp_path_factory.mktemp(build_id(build))
            family, spelling, bias = build
            big = build_big(root / "big", family, spelling, correction_bias=bias)
            shrink(big, root / "small", OPTIONS)
            cache[build] = (big, root / "small")
        return cache[build]

    return get


def read_big(big_dir: Path) -> dict[str, np.ndarray]:
    """Every big tensor, read through the index with safetensors alone."""
    weight_map = json.loads((big_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1, "the big fixture must be sharded"
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(big_dir / shard), "np") as handle:
            out.update((name, handle.get_tensor(name)) for name in handle.keys())
    return out


# ---------------------------------------------------------------------------------------------
# The config


@pytest.mark.parametrize("build", BUILDS, ids=build_id)
def test_the_small_config_keeps_every_field_but_the_sizes(shrunk, build):
    big_dir, small_dir = shrunk(build)
    big, small = (json.loads((d / "config.json").read_text()) for d in (big_dir, small_dir))
    oracle = ORACLES[build[0]]
    changed = dict(oracle.changed)
    if build[:2] == ("qwen", "5.x"):
        changed["num_local_experts"] = changed["num_experts"]  # the 5.x alias, written next to the 4.x key
    for key in oracle.kept + SPELLING_KEPT[build[1]]:
        assert key in big, f"the oracle's kept key {key} is not in the big config: the check would be vacuous"
    assert set(small) == set(big), f"keys added or dropped: {sorted(set(small) ^ set(big))}"
    wrong = {k: (small[k], v) for k, v in changed.items() if small[k] != v}
    assert not wrong, f"size keys (got, want): {wrong}"
    moved = {k: (small[k], big[k]) for k in big if k not in changed and small[k] != big[k]}
    assert not moved, f"keys that should be copied as written (got, big): {moved}"


# ---------------------------------------------------------------------------------------------
# The tensors


def fan_in(value: np.ndarray, big_in: int, small_in: int) -> np.ndarray:
    return (value.astype(np.float64) * np.sqrt(big_in / small_in)).astype(np.float32)


def oracle_tensor(name: str, a: np.ndarray, o: Oracle) -> np.ndarray:
    """The small tensor cut from big tensor `a` of Hub name `name`, restated by hand."""
    B, s = o.big, o.small
    h, H = s["H"], B["H"]
    kept = list(o.experts)
    rules = [
        (("q_norm.weight", "k_norm.weight"), lambda: a),
        (("norm.weight",), lambda: a[:h]),
        (("embed_tokens.weight",), lambda: a[:, :h]),
        (("lm_head.weight", "shared_head.head.weight", "mlp.gate.weight"),
         lambda: fan_in(a[kept, :h] if name.endswith("mlp.gate.weight") else a[:, :h], H, h)),
        (("e_score_correction_bias",), lambda: a[kept]),
        (("q_proj.weight",), lambda: fan_in(a[:s["Q"], :h], H, h)),
        (("k_proj.weight", "v_proj.weight"), lambda: fan_in(a[:s["KV"], :h], H, h)),
        (("q_proj.bias",), lambda: a[:s["Q"]]),
        (("k_proj.bias", "v_proj.bias"), lambda: a[:s["KV"]]),
        (("o_proj.weight",), lambda: fan_in(a[:h, :s["Q"]], B["Q"], s["Q"])),
        (("o_proj.bias",), lambda: a[:h]),
        (("eh_proj.weight",), lambda: fan_in(np.concatenate([a[:h, :h], a[:h, H:H + h]], axis=1), 2 * H, 2 * h)),
    ]
    width = "S" if ".shared_experts." in name else "M" if ".experts." in name else "I"
    rules += [(("gate_proj.weight", "up_proj.weight"), lambda: fan_in(a[:s[width], :h], H, h)),
              (("down_proj.weight",), lambda: fan_in(a[:h, :s[width]], B[width], s[width]))]
    return next(make() for suffixes, make in rules if name.endswith(suffixes))


def small_name(big_name: str, o: Oracle) -> str | None:
    parts = big_name.split(".")
    if parts[:2] != ["model", "layers"]:
        return big_name
    if int(parts[2]) not in o.layers:
        return None
    parts[2] = str(o.layers[int(parts[2])])
    if parts[4:5] == ["experts"]:
        if int(parts[5]) not in o.experts:
            return None
        parts[5] = str(o.experts[int(parts[5])])
    return ".".join(parts)


@pytest.mark.parametrize("build", BUILDS, ids=build_id)
def test_every_small_tensor_is_its_cut_of_the_big_one(shrunk, build):
    big_dir, small_dir = shrunk(build)
    oracle = ORACLES[build[0]]
    big = read_big(big_dir)
    small = load_file(small_dir / "model.safetensors")
    wanted = {small_name(n, oracle): n for n in big if small_name(n, oracle) is not None}
    assert set(small) == set(wanted), f"names (got ^ want): {sorted(set(small) ^ set(wanted))[:5]}"
    assert any(n.endswith("e_score_correction_bias") for n in small) == (build[0] == "glm" and build[2])
    for name, big_name in sorted(wanted.items()):
        want = oracle_tensor(big_name, big[big_name], oracle)
        got = small[name]
        assert got.dtype == np.float32 and got.shape == want.shape, f"{name}: {got.dtype} {got.shape} vs {want.shape}"
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)[0]
            pytest.fail(f"{name} (from {big_name}) differs at {tuple(bad)}: {got[tuple(bad)]} vs {want[tuple(bad)]}")


def test_router_logits_keep_their_spread(shrunk):
    """The reported spreads are what an independent restatement measures, and the shrunk routers'
    logits spread like the big ones' (hidden 64 of 128: without the fan-in scale they would shrink
    by sqrt(1/2))."""
    big_dir, small_dir = shrunk(BUILDS[0])
    result = shrink(big_dir, small_dir.parent / "again", OPTIONS)
    for small_layer, (big_std, small_std) in result.spread.items():
        big_layer = {v: k for k, v in ORACLES["glm"].layers.items()}[small_layer]
        assert np.isclose(big_std, restated_spread(big_dir, big_layer, 1e-6), rtol=1e-9)
        assert np.isclose(small_std, restated_spread(small_dir, small_layer, 1e-6), rtol=1e-9)
        assert 0.8 < small_std / big_std < 1.25, f"layer {small_layer}: big {big_std}, small {small_std}"


def restated_spread(model_dir: Path, layer: int, eps: float) -> float:
    """verifier/router_spread.py's contract: 64 fixed embeddings (ids from default_rng(0), sorted) ->
    post-attention RMSNorm -> router; the std of all logits."""
    files = sorted(model_dir.glob("*.safetensors"))
    tensors = {}
    for path in files:
        with safe_open(str(path), "np") as handle:
            tensors.update((n, handle.get_tensor(n)) for n in handle.keys())
    embed = tensors["model.embed_tokens.weight"].astype(np.float64)
    ids = np.sort(np.random.default_rng(0).choice(embed.shape[0], size=64, replace=False))
    x = embed[ids]
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * tensors[f"model.layers.{layer}.post_attention_layernorm.weight"]
    return float((x @ tensors[f"model.layers.{layer}.mlp.gate.weight"].astype(np.float64).T).std())


def test_random_weights_are_seeded_and_keep_each_tensors_spread(shrunk, tmp_path):
    big_dir, small_dir = shrunk(BUILDS[0])
    cut = load_file(small_dir / "model.safetensors")
    runs = [shrink(big_dir, tmp_path / f"r{i}", OPTIONS, random_seed=seed) for i, seed in enumerate((7, 7, 8))]
    same, again, other = (load_file(r.out_dir / "model.safetensors") for r in runs)
    assert set(same) == set(cut)
    for name, value in cut.items():
        assert np.array_equal(same[name], again[name]), f"{name}: the same seed gave other values"
        if value.size > 1:
            assert not np.array_equal(same[name], other[name]) and not np.array_equal(same[name], value), name
        if value.size >= 256:
            assert np.isclose(same[name].std(), value.std(), rtol=0.25), name
            assert abs(same[name].mean() - value.mean()) < 0.25 * value.std() + 1e-6, name


# ---------------------------------------------------------------------------------------------
# The result runs


@pytest.mark.gate_area("graph vs eager")
@pytest.mark.parametrize("build", [BUILDS[0], BUILDS[4]], ids=build_id)
def test_the_small_model_loads_and_graphs_match_eager(shrunk, build):
    from test_graph import ENGINE, generate_problems, graph_config, raise_problems

    from engine.config import EngineConfig
    from engine.llm import LLM, Prompt

    _, small_dir = shrunk(build)
    eager = LLM(small_dir, EngineConfig(**ENGINE))
    graph = LLM(small_dir, EngineConfig(**ENGINE, graph=graph_config("piecewise", prefill=(32,), decode=(4,))))
    assert eager.model_config.num_layers == 3 and eager.model_config.num_experts == 8
    prompts = [Prompt((1, 2, 3, 4, 5), "len5"), Prompt(tuple(range(40, 57)), "len17")]
    raise_problems(generate_problems(graph, eager, prompts, 3), f"shrunk {build_id(build)}")


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line naming the file, field or value, exit 2


def run_cli(capsys, big: Path, out: Path, *extra: str) -> str:
    code = verifier_main(["shrink", "--model", str(big), "--out", str(out), *ARGS, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    return err


def test_missing_config_is_named(shrunk, tmp_path, capsys):
    big = tmp_path / "big"
    shutil.copytree(shrunk(BUILDS[0])[0], big)
    (big / "config.json").unlink()
    assert f"{big / 'config.json'}: no such file" in run_cli(capsys, big, tmp_path / "out")


def test_unsupported_model_type_is_named(shrunk, tmp_path, capsys):
    big = tmp_path / "big"
    shutil.copytree(shrunk(BUILDS[0])[0], big)
    raw = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    err = run_cli(capsys, big, tmp_path / "out")
    assert str(big / "config.json") in err and "field 'model_type': 'llama' is not supported" in err


@pytest.mark.parametrize("build", [BUILDS[0], BUILDS[3]], ids=build_id)
def test_too_many_experts_is_named(shrunk, tmp_path, capsys, build):
    big = shrunk(build)[0]
    err = run_cli(capsys, big, tmp_path / "out", "--experts", "64")
    key = "n_routed_experts" if build[0] == "glm" else "num_experts"
    total = 32 if build[0] == "glm" else 16
    assert f"--experts 64 exceeds the {total} routed experts of {big}" in err and f"field '{key}'" in err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_refused(shrunk, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = run_cli(capsys, shrunk(BUILDS[0])[0], out)
    assert f"--out {out}: exists and is not an empty directory" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_an_unknown_tensor_is_named(shrunk, tmp_path):
    from safetensors.numpy import save_file

    big = tmp_path / "big"
    shutil.copytree(shrunk(BUILDS[3])[0], big)
    index = json.loads((big / "model.safetensors.index.json").read_text())
    save_file({"model.layers.0.mlp.mystery.weight": np.zeros(2, np.float32)}, str(big / "extra.safetensors"))
    index["weight_map"]["model.layers.0.mlp.mystery.weight"] = "extra.safetensors"
    (big / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ShrinkError, match=r"extra\.safetensors: tensor model\.layers\.0\.mlp\.mystery\.weight"):
        shrink(big, tmp_path / "out", OPTIONS)


def test_a_bf16_checkpoint_shrinks_to_its_exact_float32_widening(shrunk, tmp_path):
    """Hub checkpoints ship in bf16 (GLM-4.5-Air does). Shards rounded to bf16 and saved by Paddle
    shrink to exactly what the same shards widened back to float32 by Paddle shrink to."""
    import paddle
    from safetensors.numpy import save_file
    from safetensors.paddle import save_file as save_paddle

    big = shrunk(BUILDS[3])[0]
    as_bf16, widened = tmp_path / "bf16", tmp_path / "widened"
    for copy in (as_bf16, widened):
        shutil.copytree(big, copy)
    for shard in big.glob("*.safetensors"):
        rounded = {n: paddle.to_tensor(v).astype("bfloat16") for n, v in load_file(shard).items()}
        save_paddle(rounded, str(as_bf16 / shard.name), metadata={"format": "pt"})
        save_file({n: v.astype("float32").numpy() for n, v in rounded.items()}, str(widened / shard.name))
    got, want = (shrink(d, tmp_path / f"{d.name}-small", OPTIONS).out_dir / "model.safetensors"
                 for d in (as_bf16, widened))
    got, want = load_file(got), load_file(want)
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name


def test_vocab_keeps_the_leading_token_ids(shrunk, tmp_path):
    big_dir = shrunk(BUILDS[0])[0]
    small_dir = shrink(big_dir, tmp_path / "small", Options(**{**OPTIONS.__dict__, "vocab": 200})).out_dir
    assert json.loads((small_dir / "config.json").read_text())["vocab_size"] == 200
    big, small = read_big(big_dir), load_file(small_dir / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.3.embed_tokens.weight"):
        assert np.array_equal(small[name], big[name.replace("layers.3", "layers.5")][:200, :64]), name
    for name in ("lm_head.weight", "model.layers.3.shared_head.head.weight"):
        want = fan_in(big[name.replace("layers.3", "layers.5")][:200, :64], 128, 64)
        assert np.array_equal(small[name], want), name


@pytest.mark.parametrize("block_bytes", [2000, 16 * 2**20], ids=["blocks-of-a-few-rows", "one-block"])
def test_the_reader_gives_what_safetensors_gives(shrunk, monkeypatch, block_bytes):
    """verifier/tensor_reader.py reads rows with positioned reads, a block at a time; any part of any
    tensor must equal safetensors' own reading of it."""
    from verifier import tensor_reader

    monkeypatch.setattr(tensor_reader, "BLOCK_BYTES", block_bytes)
    big_dir = shrunk(BUILDS[0])[0]
    reader = tensor_reader.TensorReader(big_dir)
    for name, value in read_big(big_dir).items():
        parts = [(), tuple(slice(1, max(1, n - 1)) for n in value.shape), (slice(0, value.shape[0] // 3 + 1),)]
        for part in parts:
            assert np.array_equal(reader.read(name, part), value[part]), (name, part)


def test_a_seed_without_random_weights_is_refused(shrunk, tmp_path, capsys):
    err = run_cli(capsys, shrunk(BUILDS[0])[0], tmp_path / "out", "--seed", "3")
    assert "--seed is only used with --random-weights" in err and not (tmp_path / "out").exists()
