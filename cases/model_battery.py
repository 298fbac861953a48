"""What the battery (cases/test_user_model.py) needs to know about a checkpoint named by --model.

The battery runs the gate's own checks (imported from the fixtures' case files) on a folder the
gate has never seen. This module holds only what those checks cannot take from a bundled fixture:
prompts drawn within the model's vocabulary, whether its shapes split over 4 ranks, config
variants that leave the weights where they are, the liveness edits that apply to its fields, and
a transformers run of it when the `goldens` extra is installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from engine.config import ConfigError, ModelConfig
from engine.llm import Prompt

# Areas of the battery, in report order, and the gate report's area each one files under
# (verifier/report.py AREAS); the per-model section of the report keeps the battery's own names.
AREAS = {
    "graph vs eager": "graph vs eager",
    "chunked": "reference",
    "moe forms": "reference",
    "ranks": "ranks",
    "routing replay": "routing replay",
    "config liveness": "config",
    "capture lint": "capture lint",
    "goldens": "reference",
    "truth": "truth",
    "prefix cache": "prefix cache",
}
PROMPT_LENGTHS = (5, 17, 33, 64)  # the fixtures' default prompt lengths: 119 tokens in 4 sequences
RANKS = 4


def model_id(model_dir: str | Path) -> str:
    """A short test-id part for a model folder: its name (ids must stay readable in the report)."""
    return Path(model_dir).name or str(model_dir)


def battery_prompts(vocab_size: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[Prompt]:
    """Seeded prompts within the model's vocabulary (the fixtures' prompts assume 512 ids)."""
    rng = np.random.default_rng(seed)
    return [Prompt(tuple(int(i) for i in rng.integers(0, vocab_size, n)), f"p{i}_len{n}")
            for i, n in enumerate(lengths)]


# ----------------------------------------------------------------------------- 4 ranks


def four_rank_problem(cfg: ModelConfig, ep: int) -> str | None:
    """Why the model cannot run on 4 ranks with this expert parallelism, naming the field and its
    value (the engine's own sharding rules, engine/distributed.py, decide); None when it can."""
    from engine.distributed import Partition  # imports paddle: only when a rank case runs

    shared = cfg.moe_intermediate_size * cfg.n_shared_experts
    for rank in range(RANKS):
        part = Partition(rank, RANKS, expert_parallel=ep > 1)
        try:
            part.q_heads(cfg), part.kv_heads(cfg), part.vocab(cfg), part.experts(cfg)
            part.expert_intermediate(cfg)
            if cfg.num_layers > len(cfg.moe_layers):
                part.split(cfg.intermediate_size, "intermediate_size")
            if shared:
                part.split(shared, "shared expert width (moe_intermediate_size x n_shared_experts)")
        except ConfigError as err:
            return str(err)
    return None


# ----------------------------------------------------------------------------- config variants


def variant(model_dir: Path, where: Path, raw: dict) -> Path:
    """A folder holding `raw` as config.json beside links to every other file of `model_dir`: a
    config edit without copying the weights (a real checkpoint's are gigabytes)."""
    where.mkdir(parents=True)
    for path in Path(model_dir).iterdir():
        if path.name != "config.json":
            (where / path.name).symlink_to(path.resolve())
    (where / "config.json").write_text(json.dumps(raw, indent=1))
    return where


def read_raw(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def liveness_edits(raw: dict, cfg: ModelConfig) -> list[tuple[str, object, str]]:
    """(field, new value, expectation) for every field the parser reads that this model can change
    without new weights: "changes" (the outputs must differ) or the words its refusal must hold.
    Values move away from the model's own, so each edit is a change whatever the checkpoint says."""
    model_type = raw["model_type"]
    k, rotary = cfg.top_k, cfg.rotary_dim / cfg.head_dim
    edits = [
        ("rope_theta", cfg.rope_theta * 2, "changes"),
        ("partial_rotary_factor", 0.5 if rotary != 0.5 else 1.0, "changes"),
        ("rms_norm_eps", cfg.rms_norm_eps * 1e4, "changes"),
        ("num_experts_per_tok", k - 1 if k > 1 else k + 1, "changes"),
        ("norm_topk_prob", not cfg.norm_topk_prob, "changes"),
        ("hidden_size", cfg.hidden_size * 2, "the config implies"),
        ("num_experts", cfg.num_experts * 2, "is missing"),
    ]
    if model_type == "glm4_moe":
        edits.append(("routed_scaling_factor", cfg.routed_scaling_factor + 1.0, "changes"))
        if cfg.topk_group < cfg.n_group:  # grouping that masks: keeping one group more changes routing
            edits.append(("topk_group", cfg.topk_group + 1, "changes"))
    return edits


# ----------------------------------------------------------------------------- goldens (transformers)


def goldens_missing() -> str | None:
    """Why transformers cannot build goldens here, or None when the `goldens` extra is installed."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"the `goldens` extra is not installed ({', '.join(missing)} missing): "
                f"pip install -e .[goldens] to compare against transformers")
    return None


def transformers_goldens(model_dir: Path, cfg: ModelConfig, prompts: list[Prompt]) -> dict[str, np.ndarray]:
    """The fixtures' golden arrays for this checkpoint and these prompts, made by transformers
    (fixtures/build_fixtures.py: user_checkpoint_goldens; imported here, at call time, because it
    needs the `goldens` extra that the gate's own path never imports)."""
    from fixtures import build_fixtures

    family = "glm" if cfg.architecture == "Glm4MoeForCausalLM" else "qwen"
    return build_fixtures.user_checkpoint_goldens(Path(model_dir), model_id(model_dir), family, list(cfg.moe_layers),
                                                  cfg.top_k, [list(p.input_ids) for p in prompts])
