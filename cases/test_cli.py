"""`python -m engine run`: outputs, the dump, and one clear line per user error (no traceback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from engine_cli import engine_main
from safetensors.numpy import load_file, save_file

from engine.__main__ import build_parser, main
from engine.config import CaptureTiming, GraphBackend, GraphMode
from engine.dump import read_dump
from fixtures.pytest_fixtures import PROMPTS, checkpoint_dir, rewrite_config


def run_cli(capsys, *args):
    code = main(["run", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_prompts(tmp_path, prompts):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    return path


def test_run_prints_tokens_and_writes_a_complete_dump(capsys, tmp_path):
    dump = tmp_path / "out" / "run.npz"
    code, out, err = run_cli(capsys, "--model", checkpoint_dir("qwen3_moe"), "--prompts", PROMPTS,
                             "--max-new-tokens", 3, "--dump", dump)
    assert code == 0, err
    assert [line.split(":")[0] for line in out.splitlines()] == ["p0_len5", "p1_len17", "p2_len33", "p3_len64"]
    data = read_dump(dump)
    assert data["greedy_p3"].shape == (3,) and data["logits_p3"].shape == (64, 512)
    assert data["decode_topk_ids_p0_layer2"].shape == (2, 2)
    assert out.splitlines()[0].split(": ")[1] == " ".join(map(str, data["greedy_p0"]))
    assert [p.name for p in dump.parent.iterdir()] == ["run.npz"]  # no temporary file left behind


def test_bare_list_prompts(capsys, tmp_path):
    prompts = write_prompts(tmp_path, [[1, 2, 3], [4, 5]])
    code, out, _ = run_cli(capsys, "--model", checkpoint_dir("glm4_moe"), "--prompts", prompts,
                           "--max-new-tokens", 2)
    assert code == 0 and [line.split(":")[0] for line in out.splitlines()] == ["p0", "p1"]


def broken_config(tmp_path, copy):
    model = copy("glm4_moe")
    (model / "config.json").write_text('{"architectures": ')
    return model, "not valid JSON"


def no_safetensors(tmp_path, copy):
    model = copy("glm4_moe")
    (model / "model.safetensors").unlink()
    return model, "neither model.safetensors"


def int_weights(tmp_path, copy):
    model = copy("glm4_moe")
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, model / "model.safetensors")
    return model, "tensor model.norm.weight has dtype I32"


@pytest.mark.parametrize("make", [broken_config, no_safetensors, int_weights])
def test_bad_checkpoint_is_one_clear_line(capsys, tmp_path, copy_checkpoint, make):
    model, message = make(tmp_path, copy_checkpoint)
    code, out, err = run_cli(capsys, "--model", model, "--prompts", PROMPTS)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


BAD_PROMPTS = [
    ([list(range(1, 300)) * 2], 8, "prompt 0 (p0): 598 prompt tokens + 8 new tokens exceed the model's 512"),
    ([[1, 2], []], 8, "prompt 1 (p1) is empty"),
    ([[1, 512]], 8, "token id 512 is outside the vocabulary [0, 512)"),
    ([[1, 2]], 0, "max_new_tokens must be at least 1, got 0"),
    ({"prompts": [{"input_ids": "1 2"}]}, 8, "prompt 0: 'input_ids' must be a list of integers"),
]


@pytest.mark.parametrize("prompts,max_new,message", BAD_PROMPTS)
def test_bad_prompt_is_one_clear_line(capsys, tmp_path, prompts, max_new, message):
    code, out, err = run_cli(capsys, "--model", checkpoint_dir("glm4_moe"),
                             "--prompts", write_prompts(tmp_path, prompts), "--max-new-tokens", max_new)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


def test_unknown_failpoint_is_named(capsys):
    code, _, err = run_cli(capsys, "--model", checkpoint_dir("glm4_moe"), "--prompts", PROMPTS,
                           "--failpoints", "router.no_such_fault")
    assert code == 2 and "router.no_such_fault" in err


# Invalid configurations through the CLI: one `error:` line naming the field and its value, exit 2.
# (checkpoint whose config.json is changed, or None for the bundled glm4_moe; extra CLI arguments)
CONFIG_REFUSALS = [
    ({"n_group": 16, "topk_group": 4}, [], "n_group=16 splits the 16 routed experts into groups of 1"),
    ({"topk_group": 5}, [], "topk_group=5 exceeds n_group=4"),
    ({"n_group": 3}, [], "n_group=3 does not divide the 16 routed experts"),
    ({"num_experts_per_tok": 9}, [], "field 'num_experts_per_tok': top_k=9 exceeds the 8 experts"),
    ({"num_key_value_heads": 3}, [], "field 'num_key_value_heads': num_kv_heads=3 does not divide num_heads=4"),
    ({"rms_norm_eps": 0}, [], "rms_norm_eps=0.0 is not a positive finite number"),
    ({"routed_scaling_factor": -2.5}, [], "routed_scaling_factor=-2.5 is not a positive finite number"),
    ({"head_dim": 31}, [], "partial_rotary_factor=0.25 gives a rotary width of 7.75 channels of head_dim=31: "
                           "it must be a whole number"),
    ({"head_dim": 28}, [], "field 'partial_rotary_factor': rotary_dim=7 (head_dim * partial_rotary_factor) must "
                           "be even"),
    ({"first_k_dense_replace": 7}, [], "field 'first_k_dense_replace': 7 is not a layer count within "
                                       "num_hidden_layers=4"),
    ({}, ["--max-num-batched-tokens", 0], "max_num_batched_tokens=0 is not a positive integer"),
    ({}, ["--max-num-seqs", -1], "max_num_seqs=-1 is not a positive integer"),
    ({}, ["--graph", "piecewise", "--capture-sizes", "8,4"],
     "prefill_capture_sizes: must be sorted and unique, but 8 comes before 4"),
    ({}, ["--decode-capture-sizes", "0,4"], "decode_capture_sizes: 0 is not a positive integer"),
    ({}, ["--ep", 2], "ep=2 must be 1 or equal to tp=1"),
    ({}, ["--tp", 2, "--ep", 3], "ep=3 must be 1 or equal to tp=2"),  # refused before any rank starts
]


@pytest.mark.parametrize("changes,args,message", CONFIG_REFUSALS, ids=[m.split(" ")[0] for _, _, m in CONFIG_REFUSALS])
def test_bad_config_is_one_clear_line(capsys, copy_checkpoint, changes, args, message):
    model = copy_checkpoint("glm4_moe")
    rewrite_config(model, **changes)
    code, out, err = run_cli(capsys, "--model", model, "--prompts", PROMPTS, "--max-new-tokens", 2, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


QWEN_REFUSALS = [
    ({"num_experts_per_tok": 9}, "field 'num_experts_per_tok': top_k=9 exceeds the 8 routed experts"),
    ({"decoder_sparse_step": 0}, "field 'decoder_sparse_step' must be a positive integer, got 0"),
    ({"mlp_only_layers": [5]}, "field 'mlp_only_layers' must be a list of layer indices below num_hidden_layers=3"),
]


@pytest.mark.parametrize("changes,message", QWEN_REFUSALS, ids=[m.split(" ")[1] for _, m in QWEN_REFUSALS])
def test_bad_qwen_config_is_one_clear_line(capsys, copy_checkpoint, changes, message):
    model = copy_checkpoint("qwen3_moe")
    rewrite_config(model, **changes)
    code, out, err = run_cli(capsys, "--model", model, "--prompts", PROMPTS)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and str(model / "config.json") in err and message in err


def test_dump_path_is_one_clear_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--model", checkpoint_dir("glm4_moe"), "--prompts", PROMPTS,
                           "--max-new-tokens", 1, "--dump", tmp_path / "out.txt")
    assert code == 2 and err.splitlines()[-1] == f"error: dump path {tmp_path / 'out.txt'} must end in .npz"


def test_drifted_grouping_is_one_clear_line(copy_checkpoint, faults):
    """The grouping the config once accepted and the router then refused mid-run, with a traceback.
    Run through engine_main (the CLI's main in this process, the run's failpoints passed): an
    exception escaping main would fail the case here. The real `python -m engine run` process
    (exit code, a line per prompt) is test_failpoint_reach.py's one-rank case's."""
    model = copy_checkpoint("glm4_moe")
    rewrite_config(model, n_group=16, topk_group=4)
    code, out, err = engine_main(faults, model, "--prompts", PROMPTS)
    assert code == 2 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {model / 'config.json'}: n_group=16 splits the 16 routed experts into groups of 1; "
                      "a group's score (the sum of its top-2 scores) needs at least 2 per group"]


@pytest.mark.parametrize("option,choice", [("--graph", GraphMode), ("--graph-backend", GraphBackend),
                                           ("--capture", CaptureTiming)])
def test_graph_options_offer_every_enum_value(option, choice):
    """The CLI's choices come from the config enums: every member is accepted, nothing else."""
    base = ["run", "--model", "m", "--prompts", "p.json"]
    for member in choice:
        args = build_parser().parse_args([*base, option, member.value])
        assert getattr(args, option.lstrip("-").replace("-", "_")) == member.value
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, option, "bogus"])


def test_graph_flags_and_chunking_reach_the_engine(capsys, tmp_path, faults, golden):
    """--graph, --capture-sizes, --decode-capture-sizes and --max-num-batched-tokens through the CLI:
    every step (chunks of at most 7 tokens, padded to 4 or 7, then decodes of 4) replays a captured size, and the
    dump still matches the Hugging Face goldens (a second, independent check of chunked prefill
    next to test_batching.py: a chunk after a cached prefix must get its true positions)."""
    import ast

    from verifier.dumps import compare_dumps
    from verifier.tolerance import GOLDEN_LOGITS, GOLDEN_MAX_REL_L2

    reference = golden("glm4_moe")
    dump = tmp_path / "graph.npz"
    code, _, err = run_cli(capsys, "--model", checkpoint_dir("glm4_moe"), "--prompts", PROMPTS,
                           "--max-new-tokens", int(reference["meta_max_new_tokens"]), "--graph", "piecewise",
                           "--capture-sizes", "4,7", "--decode-capture-sizes", "4",
                           "--max-num-batched-tokens", 7, "--dump", dump,
                           "--failpoints", ",".join(sorted(faults.active)))
    assert code == 0, err
    stats = ast.literal_eval(err.split("graphs: ", 1)[1].splitlines()[0])
    assert stats["replays"] > 0 and stats["fallbacks"] == 0, stats
    compare_dumps(read_dump(dump), reference, logits_tol=GOLDEN_LOGITS, max_rel_l2=GOLDEN_MAX_REL_L2).assert_ok()


def test_a_bad_collective_timeout_in_the_environment_is_named(capsys, monkeypatch):
    monkeypatch.setenv("ENGINE_COLLECTIVE_TIMEOUT", "abc")
    code, _, err = run_cli(capsys, "--model", checkpoint_dir("glm4_moe"), "--prompts", PROMPTS)
    assert (code, err) == (2, "error: ENGINE_COLLECTIVE_TIMEOUT='abc': not a number of seconds\n")
