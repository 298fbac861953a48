"""`python -m engine run`: run a prompts file through a checkpoint and optionally dump every output.

Environment variables are read here and nowhere else: ENGINE_FAILPOINTS (comma-separated
failpoint names) is the default of --failpoints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine",
        description="Reference MoE runtime (GLM-4.5 / Qwen3-MoE checkpoints in Hugging Face layout).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate greedily for a prompts file",
                         description="Run every prompt of FILE as one batched workload and print the "
                                     "generated token ids per prompt.")
    run.add_argument("--model", required=True, metavar="DIR",
                     help="checkpoint directory: config.json + model.safetensors (or sharded with an index)")
    run.add_argument("--prompts", required=True, metavar="FILE",
                     help='JSON: {"prompts": [{"input_ids": [...], "name": "..."}]} or a list of id lists')
    run.add_argument("--max-new-tokens", type=int, default=8, metavar="N",
                     help="greedy tokens to generate per prompt, exactly (default 8)")
    run.add_argument("--dump", metavar="OUT.npz",
                     help="write logits, greedy tokens and routed expert ids here (see engine/dump.py)")
    run.add_argument("--max-num-batched-tokens", type=int, default=8192, metavar="T",
                     help="token budget of one step; smaller values force chunked prefill (default 8192)")
    run.add_argument("--max-num-seqs", type=int, default=64, metavar="S",
                     help="sequences running at once (default 64)")
    run.add_argument("--failpoints", default=os.environ.get("ENGINE_FAILPOINTS", ""), metavar="NAMES",
                     help="comma-separated faults to plant, for testing the gate (default: $ENGINE_FAILPOINTS)")
    run.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return parser


def run(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.dump import dump_arrays, write_dump
    from engine.failpoints import Failpoints
    from engine.llm import LLM
    from engine.prompts import read_prompts

    from engine.config import ConfigError

    try:
        faults = Failpoints.parse(args.failpoints)
    except ValueError as err:
        raise ConfigError(f"--failpoints: {err}") from None
    prompts = read_prompts(args.prompts)
    engine = EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                          faults=faults)
    start = time.perf_counter()
    llm = LLM(args.model, engine)
    outputs = llm.generate(prompts, args.max_new_tokens, record_prompt_logits=bool(args.dump))
    elapsed = time.perf_counter() - start
    for out in outputs:
        print(f"{out.name}: {' '.join(map(str, out.greedy))}")
    if args.dump:
        path = write_dump(args.dump, dump_arrays(outputs, llm.model_config.moe_layers))
        print(f"wrote {path}", file=sys.stderr)
    print(f"{len(outputs)} prompts, {args.max_new_tokens} new tokens each, {elapsed:.2f} s", file=sys.stderr)
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input: reported as one line, no traceback."""
    from engine.config import ConfigError
    from engine.kv_cache import CacheFullError
    from engine.llm import PromptError
    from engine.loader import CheckpointError
    from engine.moe.router import RouterError
    from engine.prompts import PromptsFileError
    return ConfigError, CheckpointError, PromptError, PromptsFileError, RouterError, CacheFullError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's import-time build notice
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
