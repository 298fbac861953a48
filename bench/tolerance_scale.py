"""The float32 row's atol against the logits' scale (verifier/tolerance.py ROW_UNIT).

Builds, under $TOLERANCE_SCALE_DIR (default /tmp/tolerance_scale), the bundled GLM and Qwen fixtures
with model.norm.weight scaled 1x, 4x and 16x (logits scale with it; powers of two exactly), and a
hidden-1024 GLM with lm_head std 0.3 (logits RMS ~10); then runs graph (piecewise and
full_and_piecewise) against eager on 7 prompts x 6 new tokens and prints one JSON line per
(checkpoint, mode): the eager logits' row RMS, the greatest |graph - eager|, that over the row RMS,
rel L2, and the greatest error / bound for an absolute atol and for atol x max(1, RMS / unit).

    python -m bench.tolerance_scale            # build and measure all
    python -m bench.tolerance_scale DIR...     # measure these checkpoints
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("TOLERANCE_SCALE_DIR", "/tmp/tolerance_scale"))


def scaled(name: str, factor: int) -> Path:
    """A copy of a bundled fixture whose final norm weight (so every logit) is `factor` x larger."""
    src = ROOT / "fixtures/checkpoints" / name
    dst = OUT / f"{name}_x{factor}"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    w = load_file(src / "model.safetensors")
    w["model.norm.weight"] = (w["model.norm.weight"] * np.float32(factor)).astype(np.float32)
    save_file(w, dst / "model.safetensors")
    return dst


def synthetic(lm_std: float = 0.3) -> Path:
    """A hidden-1024 GLM (3 layers, 8 experts) with N(0, 0.02) weights and lm_head N(0, lm_std)."""
    from engine.checkpoint.hub_schema import expected_tensors
    from engine.hf_config import read_model_config
    dst = OUT / "hidden1024"; dst.mkdir(parents=True, exist_ok=True)
    cfg = json.load(open(ROOT / "fixtures/checkpoints/glm4_moe/config.json"))
    cfg.update(hidden_size=1024, head_dim=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=2048,
               moe_intermediate_size=512, vocab_size=4096, num_hidden_layers=3, first_k_dense_replace=1,
               n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, num_nextn_predict_layers=0,
               rms_norm_eps=1e-5)
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.5
    json.dump(cfg, open(dst / "config.json", "w"), indent=1)
    mc = read_model_config(dst)
    rng = np.random.default_rng(0)
    w = {}
    for name, shape in expected_tensors(mc).items():
        v = rng.standard_normal(shape, dtype=np.float32) * np.float32(lm_std if name == "lm_head.weight" else 0.02)
        w[name] = v + np.float32(1.0) if name.endswith("norm.weight") else v
    save_file(w, dst / "model.safetensors")
    return dst


def build_all() -> list[str]:
    dirs = [scaled(name, f) for name in ("glm4_moe", "qwen3_moe") for f in (1, 4, 16)]
    return [str(d) for d in dirs + [synthetic()]]


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cases"))
from test_graph import ENGINE, MODES, graph_config  # noqa: E402 (the cases folder, just put on the path)

from engine.config import EngineConfig
from engine.dump import dump_arrays
from engine.llm import LLM, Prompt

RTOL = ATOL = 1e-5
UNITS = (1.0, 4.0, 8.0)


def prompts_for(vocab):
    rng = np.random.default_rng(0)
    out = [Prompt(tuple(int(i) for i in rng.integers(0, vocab, n)), f"len{n}") for n in (5, 17, 30)]
    rng = np.random.default_rng(1)
    out += [Prompt(tuple(int(i) for i in rng.integers(0, vocab, n)), f"r{n}") for n in (3, 9, 24, 40)]
    return out


def ratio(d, e, rms, unit):
    scale = np.maximum(1.0, rms / unit) if unit else 1.0
    return float(np.max(d / (ATOL * scale + RTOL * np.abs(e))))


def main(dirs):
    for d in dirs:
        eager = LLM(d, EngineConfig(**ENGINE))
        prompts = prompts_for(eager.model_config.vocab_size)
        layers = eager.model_config.moe_layers
        want = dump_arrays(eager.generate(prompts, 6), layers)
        for mode in MODES:
            graph = LLM(d, EngineConfig(**ENGINE, graph=graph_config(mode)))
            got = dump_arrays(graph.generate(prompts, 6), layers)
            keys = [k for k in want if "logits" in k]
            e = [want[k].astype(np.float64).reshape(-1, want[k].shape[-1]) for k in keys]
            a = [got[k].astype(np.float64).reshape(-1, got[k].shape[-1]) for k in keys]
            rms = [np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) for x in e]
            diff = [np.abs(x - y) for x, y in zip(a, e)]
            row = {"model": d.rsplit("/", 1)[-1], "mode": mode,
                   "rms_min": float(min(r.min() for r in rms)), "rms_max": float(max(r.max() for r in rms)),
                   "maxabs_max": float(max(np.abs(x).max() for x in e)),
                   "max_err": float(max(x.max() for x in diff)),
                   "max_err_over_rms": float(max((x / r).max() for x, r in zip(diff, rms))),
                   "rel_l2": float(max(np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(diff, e))),
                   "ratio_abs": max(ratio(x, y, r, 0) for x, y, r in zip(diff, e, rms))}
            for unit in UNITS:
                row[f"ratio_unit{unit:g}"] = max(ratio(x, y, r, unit) for x, y, r in zip(diff, e, rms))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or build_all())
