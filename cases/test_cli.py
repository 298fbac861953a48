"""`python -m engine run`: outputs, the dump, and one clear line per user error (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from engine.__main__ import main
from engine.dump import read_dump
from fixtures.pytest_fixtures import PROMPTS, checkpoint_dir


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


def test_module_entry_point(tmp_path):
    """The real `python -m engine` process: exit codes and no traceback on a user error."""
    ok = subprocess.run([sys.executable, "-m", "engine", "run", "--model", str(checkpoint_dir("glm4_moe")),
                         "--prompts", str(PROMPTS), "--max-new-tokens", "2"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 4
    bad = subprocess.run([sys.executable, "-m", "engine", "run", "--model", str(tmp_path),
                          "--prompts", str(PROMPTS)], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "config.json" in bad.stderr
