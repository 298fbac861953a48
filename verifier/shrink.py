"""`python -m verifier shrink --model BIG --out SMALL`: a small checkpoint cut from a big one, in the
same Hub layout and architecture, so a model that does not fit this machine can still be gated.

What is kept and how it is cut: verifier/shrink_plan.py (config, layers, experts, widths) and
verifier/shrink_tensors.py (each tensor's part and fan-in scale). The big checkpoint is read one
shard at a time and one slice at a time, so memory holds the small model plus one slice, never the
big model. SMALL gets config.json, model.safetensors (float32) and a copy of every other file of
BIG that is not weights (generation_config.json, tokenizer files, ...).

--random-weights replaces every tensor by seeded normal values with the mean and standard deviation
of its cut (spreads stay; the big model's values do not). The report ends with the router logits'
spread in both models (verifier/router_spread.py says how it is measured).

Exit 0 written, 2 bad input (one `error:` line naming the file, field or option).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from engine.checkpoint.hub_schema import expected_tensors, optional_tensors
from engine.checkpoint.loader import INDEX_FILE, SINGLE_FILE
from engine.errors import UserError
from engine.hf_config import read_config_json
from verifier.router_spread import router_spread
from verifier.shrink_plan import Options, ShrinkError, ShrinkPlan, make_plan
from verifier.shrink_tensors import Cut, cut_for
from verifier.tensor_reader import TensorReader, open_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass(frozen=True)
class ShrinkResult:
    plan: ShrinkPlan
    out_dir: Path
    tensors: int
    bytes_written: int
    copied: tuple[str, ...]  # the other files copied from BIG
    spread: dict[int, tuple[float, float]]  # small MoE layer -> (big router logit std, small's)


def shrink(big_dir: str | Path, out_dir: str | Path, options: Options = Options(),
           random_seed: int | None = None) -> ShrinkResult:
    """Write the shrunk checkpoint of `big_dir` into `out_dir` (absent or empty)."""
    big_dir, out_dir = Path(big_dir), Path(out_dir)
    _check_out(out_dir)
    plan = make_plan(read_config_json(big_dir / "config.json"), big_dir / "config.json", options)
    reader = TensorReader(big_dir)
    tensors = _cut_all(reader, plan, random_seed)
    _check_complete(tensors, plan, big_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    _readable_as_umask_allows(out_dir / SINGLE_FILE)
    (out_dir / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    copied = _copy_other_files(big_dir, out_dir)
    return ShrinkResult(plan, out_dir, len(tensors), sum(t.nbytes for t in tensors.values()), copied,
                        _spreads(reader, TensorReader(out_dir), plan))


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ShrinkError(f"--out {out_dir}: exists and is not an empty directory (shrink never overwrites)")


def _cut_all(reader: TensorReader, plan: ShrinkPlan, random_seed: int | None) -> dict[str, np.ndarray]:
    """Every kept tensor, read shard by shard (one shard mapped at a time)."""
    out: dict[str, np.ndarray] = {}
    for path, names in reader.names_by_file(reader.files).items():
        with open_file(path) as shard:
            for name in names:
                cut = cut_for(name, shard.shape(name), plan, str(path))
                if cut is not None:
                    out[cut.name] = _randomised(_apply(shard, name, cut), cut.name, random_seed)
    return dict(sorted(out.items()))


def _apply(shard, name: str, cut: Cut) -> np.ndarray:
    value = np.concatenate([shard.read(name, part) for part in cut.parts], axis=-1)
    if cut.rows is not None:
        value = value[list(cut.rows)]
    if cut.scale != 1.0:
        value = (value.astype(np.float64) * cut.scale).astype(np.float32)
    return np.ascontiguousarray(value)


def _randomised(value: np.ndarray, name: str, seed: int | None) -> np.ndarray:
    """`value` itself, or (with a seed) normal values with its mean and std, one stream per name."""
    if seed is None:
        return value
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    wide = value.astype(np.float64)
    return (wide.mean() + wide.std() * rng.standard_normal(value.shape)).astype(np.float32)


def _check_complete(tensors: dict, plan: ShrinkPlan, big_dir: Path) -> None:
    missing = sorted(set(expected_tensors(plan.small)) - set(tensors) - optional_tensors(plan.small))
    if missing:
        raise ShrinkError(f"{big_dir}: the shrunk model needs {missing[0]}, but its source tensor is "
                          f"missing from the big checkpoint ({len(missing)} missing)")


def _readable_as_umask_allows(path: Path) -> None:
    """safetensors writes 0600 files; give the weights the mode any other new file gets."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _copy_other_files(big_dir: Path, out_dir: Path) -> tuple[str, ...]:
    """Tokenizer, generation config and the like: every file that is not weights, config or index."""
    copied = []
    for path in sorted(big_dir.iterdir()):
        if path.is_file() and path.name not in ("config.json", INDEX_FILE) and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    return tuple(copied)


def _spreads(big: TensorReader, small: TensorReader, plan: ShrinkPlan) -> dict[int, tuple[float, float]]:
    big_layers = [plan.layers[i] for i in plan.small.moe_layers]
    vocab = plan.small.vocab_size  # ids both models have
    before = router_spread(big, plan.big, big_layers, vocab)
    after = router_spread(small, plan.small, plan.small.moe_layers, vocab)
    return {i: (before[b], after[i]) for i, b in zip(plan.small.moe_layers, big_layers)}


# ---------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="BIG", help="the big checkpoint directory (Hub layout)")
    parser.add_argument("--out", required=True, metavar="SMALL", help="where to write the shrunk one (absent or empty)")
    sizes = parser.add_argument_group("sizes (defaults: 1 dense + 2 MoE layers, 2*top_k experts, hidden 256, "
                                      "2 KV heads' worth of query heads, intermediate 512, expert intermediate 128; "
                                      "never above the big model's)")
    for flag, meaning in (("--layers", "decoder layers (the first of each kind)"),
                          ("--experts", "routed experts (the first of each group)"), ("--hidden", "hidden size"),
                          ("--heads", "query heads (KV heads follow the big model's ratio)"),
                          ("--intermediate", "dense MLP intermediate size"),
                          ("--moe-intermediate", "expert intermediate size"),
                          ("--vocab", "leading token ids kept (default all; tokenizer files are copied as they are)")):
        sizes.add_argument(flag, type=int, metavar="N", help=meaning)
    parser.add_argument("--random-weights", action="store_true",
                        help="seeded normal weights with each cut tensor's mean and std, instead of the cut values")
    parser.add_argument("--seed", type=int, default=None, help="the seed of --random-weights (default 0)")


def run(args: argparse.Namespace) -> int:
    if args.seed is not None and not args.random_weights:
        print("error: --seed is only used with --random-weights", file=sys.stderr)
        return 2
    options = Options(args.layers, args.experts, args.hidden, args.heads, args.intermediate, args.moe_intermediate,
                      args.vocab)
    try:
        result = shrink(args.model, args.out, options, (args.seed or 0) if args.random_weights else None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(result, args.model))
    return 0


def describe(result: ShrinkResult, big_dir: str) -> str:
    """The summary the verb prints: what was kept, what was written, the router spreads."""
    p, big, small = result.plan, result.plan.big, result.plan.small
    lines = [f"shrunk {big_dir} -> {result.out_dir} ({small.architecture}, model_type {p.config['model_type']})",
             f"  layers     {small.num_layers} of {big.num_layers}: big layers {list(p.layers)}, MoE at "
             f"{list(small.moe_layers)}; MTP layers {small.num_mtp_layers}",
             f"  experts    {small.num_experts} of {big.num_experts}, top_k {small.top_k}, n_group {small.n_group} "
             f"(was {big.n_group}), topk_group {small.topk_group} (was {big.topk_group})",
             f"  widths     hidden {small.hidden_size}/{big.hidden_size}, heads {small.num_heads}/{big.num_heads}, "
             f"KV heads {small.num_kv_heads}/{big.num_kv_heads}, head_dim {small.head_dim}, intermediate "
             f"{small.intermediate_size}/{big.intermediate_size}, expert intermediate "
             f"{small.moe_intermediate_size}/{big.moe_intermediate_size}, vocab {small.vocab_size}/{big.vocab_size}",
             f"  wrote      {result.tensors} tensors, {result.bytes_written / 2**20:.1f} MiB; config keys added: "
             f"{', '.join(p.added_keys) or 'none'}; copied: {', '.join(result.copied) or 'nothing'}",
             "  router logit std (64 fixed token embeddings -> post-attention RMSNorm -> router, float64):"]
    lines += [f"    small layer {layer} (big {p.layers[layer]}): big {b:.4f}, small {s:.4f} (ratio {s / b:.3f})"
              for layer, (b, s) in result.spread.items()]
    return "\n".join(lines)
