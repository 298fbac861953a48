"""Measure the float32 engine's error against a float64 truth, per mode: the evidence behind
`verifier/tolerance.py`'s TRUTH_RATIO and TRUTH_FLOOR (dev only, never part of the gate).

    python -m bench.truth_spread truth  OUT_DIR            # float64 dumps of the fixtures (needs torch)
    python -m bench.truth_spread spread TRUTH_DIR DUMP...  # per key: rel L2 to the truth, ratios between modes

The truth here is the Hugging Face model run in float64 (torch, eager), a stand-in until the
engine runs in float64 (issue 23 items 1-2): it computes the GLM router logits and the rotary
angles in float32, 1.6e-7 from a pure float64 computation (issue 23), so errors it reports for
float32 runs (5e-7 and up) carry that much of its own. A dump is named `<fixture>.<mode>.npz`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "fixtures" / "prompts" / "default.json"
FIXTURES = ("glm4_moe", "qwen3_moe")
MAX_NEW_TOKENS = 8


def hf_truth(fixture: str) -> dict[str, np.ndarray]:
    """Prefill logits and greedy decode (float64) of every default prompt, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(ROOT / "fixtures" / "checkpoints" / fixture, dtype=torch.float64,
                                                 attn_implementation="eager", experts_implementation="eager")
    model.eval()
    arrays: dict[str, np.ndarray] = {}
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = prompt["input_ids"]
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0]
            greedy, rows = [], [logits[-1]]
            for step in range(MAX_NEW_TOKENS):
                greedy.append(int(rows[-1].argmax()))
                if step == MAX_NEW_TOKENS - 1:
                    break
                out = model(input_ids=torch.tensor([[greedy[-1]]]), past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1])
            arrays[f"input_ids_p{i}"] = np.asarray(ids, np.int64)
            arrays[f"logits_p{i}"] = logits.numpy().astype(np.float64)
            arrays[f"greedy_p{i}"] = np.asarray(greedy, np.int64)
            arrays[f"greedy_logits_p{i}"] = torch.stack(rows).numpy().astype(np.float64)
    return arrays


def rel_l2(a: np.ndarray, t: np.ndarray) -> float:
    t = t.astype(np.float64)
    return float(np.linalg.norm(a.astype(np.float64) - t) / np.linalg.norm(t))


def spread(truth_dir: Path, dumps: list[Path]) -> None:
    """Print each float key's error against the truth per mode, and the greatest ratio between modes."""
    by_fixture: dict[str, dict[str, dict]] = {}
    for path in dumps:
        fixture, mode = path.name.split(".")[:2]
        with np.load(path) as data:
            by_fixture.setdefault(fixture, {})[mode] = {k: data[k] for k in data.files}
    for fixture, modes in sorted(by_fixture.items()):
        with np.load(truth_dir / f"{fixture}.npz") as data:
            truth = {k: data[k] for k in data.files}
        keys = sorted(k for k in truth if k.startswith(("logits_p", "greedy_logits_p")))
        errors = {m: np.array([rel_l2(d[k], truth[k]) for k in keys]) for m, d in sorted(modes.items())}
        print(f"\n{fixture}: rel L2 against the float64 truth, per key ({', '.join(keys)})")
        for mode, err in errors.items():
            print(f"  {mode:<12} min {err.min():.3g}  median {np.median(err):.3g}  max {err.max():.3g}")
        table = np.stack(list(errors.values()))  # [modes, keys]
        worst = (table.max(0) / table.min(0)).max()
        print(f"  greatest ratio between two modes on one key: {worst:.3f}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["truth"] and len(argv) == 2:
        out = Path(argv[1])
        out.mkdir(parents=True, exist_ok=True)
        for fixture in FIXTURES:
            np.savez(out / f"{fixture}.npz", **hf_truth(fixture))
        return 0
    if argv[:1] == ["spread"] and len(argv) >= 3:
        spread(Path(argv[1]), [Path(p) for p in argv[2:]])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
