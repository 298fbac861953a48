"""The routing-replay (R3) cases' shared set-up and checks: the engine they build, a recording run, and
the plain checks on recorded tables (cases/test_routing_replay_engine.py, test_routing_replay_ranks.py,
test_prefix_gate.py and test_user_model.py use them). The checks return a list of problems, empty when
the tables hold; the cases assert on it.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from engine.config import EngineConfig, GraphConfig
from engine.failpoints import Failpoints
from engine.llm import LLM, Prompt
from engine.routing_replay import model_identity
from engine.routing_replay.reader import load_routing
from engine.routing_replay.session import attach_routing
from fixtures.pytest_fixtures import checkpoint_dir
from verifier.dumps import GROUPING_KEY, routing_diff

# The dense MoE form, the reference: graph and eager run the same kernels on the same rows, so
# the bitwise contracts below hold (the sparse form's graphs run a fixed capacity: test_moe_forms.py).
ENGINE = {"max_num_batched_tokens": 32, "max_num_seqs": 8,
          "moe_form": "dense"}  # chunked prefill and mixed steps
# Prefill steps of 17-32 tokens replay 32, of <= 16 replay 16; decode steps of <= 4 sequences replay
# 4 and of 5-8 fall back to eager (above the largest decode size).
SIZES = {"prefill_capture_sizes": (16, 32), "decode_capture_sizes": (4,)}
MODES = ("piecewise", "full_and_piecewise")
NAME = "glm4_moe"
MAX_NEW = 8  # the goldens' max_new_tokens


def build(faults: Failpoints, name: str = NAME, mode: str = "eager", capture: str = "eager") -> LLM:
    graph = GraphConfig(mode=mode, capture=capture, **SIZES) if mode != "eager" else GraphConfig()
    return LLM(checkpoint_dir(name), EngineConfig(**ENGINE, graph=graph, faults=faults))


def record(llm: LLM, prompts: list[Prompt], directory: Path, max_new: int = MAX_NEW, faults: str | None = None):
    """Run `prompts` recording into `directory`; returns (outputs, tables by name, recorded step kinds,
    graph counters during the run)."""
    session = attach_routing(llm, directory, None if faults is None else Failpoints.parse(faults))
    before = Counter(llm.runner.stats.summary())
    outputs = llm.generate(prompts, max_new)
    counters = Counter(llm.runner.stats.summary())
    counters.subtract(before)
    cfg = llm.model_config
    tables = {p.name: load_routing(directory / f"{p.name}.safetensors", model=model_identity(cfg),
                                   moe_layers=cfg.moe_layers, top_k=cfg.top_k) for p in prompts}
    return outputs, tables, session.recorder.steps, counters


def copy_recording(source: Path, folder: Path) -> None:
    """The recording's files into a replaying engine's folder (read at its next workload's start)."""
    for path in source.glob("*.safetensors"):
        shutil.copyfile(path, folder / path.name)


def check_tables(tables: dict, prompts: list[Prompt], max_new: int, layers: tuple[int, ...], top_k: int) -> list[str]:
    """Every request has a table of [prompt + max_new - 1, layers, top_k] with no -1 and k distinct ids per row."""
    problems = []
    for p in prompts:
        ids = tables[p.name].ids
        want = (len(p.input_ids) + max_new - 1, len(layers), top_k)
        if ids.shape != want:
            problems.append(f"{p.name}: shape {ids.shape}, expected {want}")
        elif (ids < 0).any() or (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
            problems.append(f"{p.name}: rows with -1 or repeated experts")
    return problems


def check_matches_outputs(tables: dict, outputs, layers: tuple[int, ...]) -> list[str]:
    """Each table equals, as expert sets, the routing the engine returned step by step."""
    problems = []
    for out in outputs:
        for col, layer in enumerate(layers):
            want = np.concatenate([out.topk_ids(layer), out.topk_ids(layer, decode=True)])
            got = np.sort(tables[out.name].ids[:, col].astype(np.int64), axis=-1)
            if got.shape != want.shape or not np.array_equal(got, want):
                problems.append(f"{out.name} layer {layer}: recorded routing differs from the step outputs")
    return problems


def check_same_tables(tables: dict, reference: dict, label: str) -> list[str]:
    """Bitwise equal ids (same order within each row) to a reference recording."""
    return [f"{label}: {name} differs from the eager recording" for name in reference
            if tables[name].ids.dtype != reference[name].ids.dtype
            or not np.array_equal(tables[name].ids, reference[name].ids)]


def check_goldens(tables: dict, prompts: list[Prompt], outputs, golden: dict, layers) -> list[str]:
    """The goldens' expert sets, except rows near-tied under the project's one rule (verifier.dumps
    `routing_diff` on the goldens' deciding values); decode rows only while the greedy tokens agree."""
    problems = []
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        same_tokens = np.array_equal(out.greedy, golden[f"greedy_p{i}"])
        for col, layer in enumerate(layers):
            parts = [("", 0)] + ([("decode_", len(p.input_ids))] if same_tokens else [])
            for prefix, start in parts:
                key = f"{prefix}topk_ids_p{i}_layer{layer}"
                want = golden[key]
                got = tables[p.name].ids[start:start + len(want), col].astype(np.int64)
                diff = routing_diff(key, got, want, golden[key.replace("topk_ids", "topk_margin")],
                                    golden.get(GROUPING_KEY))
                if not diff.passed:
                    problems.append(f"{p.name} layer {layer}: {prefix}row {diff.mismatched_rows[0]} differs from golden")
    return problems


def check_same_outputs(got, want) -> list[str]:
    """Prompt logits, greedy tokens and their logits bitwise equal, request by request."""
    problems = []
    for a, b in zip(got, want):
        if not (np.array_equal(a.logits(), b.logits()) and a.greedy == b.greedy
                and all(np.array_equal(x, y) for x, y in zip(a.greedy_logits, b.greedy_logits))):
            problems.append(f"{a.name}: logits or tokens differ")
    return problems
