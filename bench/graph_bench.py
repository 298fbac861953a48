"""`python -m bench.graph_bench`: capture cost and eager-vs-piecewise prefill speed, with a verdict.

For each model (the bundled GLM fixture, a larger synthetic GLM-style config, or both):
  1. capture time and resident memory for the prefill capture sizes (the whole 4..8192 ladder,
     58 sizes, largest first; `--quick` captures only the timed sizes);
  2. prefill step time per size, eager vs piecewise (static backend), measured in the same run,
     at exactly the capture size and at size - 1 (one padded row);
  3. where a piecewise step's time goes: eager attention, compiled pieces, and the graph path's
     own cost (copy-in with padding, copy into the output buffers).
Prints a table, checks the goals of issue 3 ("Speed and memory") and writes a small JSON file
under bench/results/. With `--model both`, each model runs in its own process so that resident
memory is measured from a clean start. Environment variables are read (and OMP_NUM_THREADS set,
before Paddle is imported) here only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine, report

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("fixture", "synthetic")

# (capture sizes or None for the whole ladder, timed step sizes, reps, tokens per sequence)
PLANS = {
    ("fixture", False): (None, (4, 16, 64, 256, 512, 1024, 2048, 4096, 8192), 5, 512),
    # The whole ladder takes 30+ minutes on the synthetic model (each size's first run is a full step).
    ("synthetic", False): ((16, 64, 512, 2048, 8192), (16, 512, 2048, 8192), 3, 1024),
    ("fixture", True): ((16, 512, 2048, 8192), (16, 512, 8192), 3, 512),
    ("synthetic", True): ((16, 512), (16, 512), 3, 1024),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.graph_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=(*MODELS, "both"), default="both")
    parser.add_argument("--quick", action="store_true",
                        help="a few sizes only (about 2 minutes); the capture numbers are then not the full ladder")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), metavar="N",
                        help="OMP_NUM_THREADS for Paddle's kernels (default: every CPU)")
    parser.add_argument("--reps", type=int, metavar="R", help="timed repetitions per mode and step (default per plan)")
    parser.add_argument("--paddle-flag", action="append", default=[], metavar="FLAGS_NAME=VALUE",
                        help="a Paddle flag, set in the environment before Paddle is imported (repeatable), e.g. "
                             "FLAGS_new_executor_serial_run=1")
    parser.add_argument("--note", default="", help="free text stored in the result file")
    parser.add_argument("--out", type=Path, metavar="FILE.json",
                        help="result file (default bench/results/<cpu>-<cores>c-<date>.json)")
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)  # one model, raw result, no table
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before the first `import paddle`
    for flag in args.paddle_flag:
        name, _, value = flag.partition("=")
        if not name.startswith("FLAGS_") or not value:
            raise SystemExit(f"--paddle-flag: expected FLAGS_NAME=VALUE, got {flag!r}")
        os.environ[name] = value
    if args.child_out:
        args.child_out.write_text(json.dumps(run_model(args.model, args)))
        return 0
    models = MODELS if args.model == "both" else (args.model,)
    started, described = time.perf_counter(), describe_machine(args)
    results = {}
    for name in models:
        try:
            results[name] = run_child(name, args) if len(models) > 1 else run_model(name, args)
        except subprocess.CalledProcessError as err:  # keep what the other model measured
            progress(f"[{name}] failed ({err}); its results are left out")
    result = {"machine": described, "quick": args.quick, "note": args.note, "paddle_flags": args.paddle_flag,
              "wall_seconds": round(time.perf_counter() - started, 1), "models": results}
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["goals"] = report.goals(results)
    print(report.render(result))
    path = args.out or RESULTS / f"{machine.slug(result['machine'])}-{time.strftime('%Y%m%d-%H%M')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


def run_model(name: str, args: argparse.Namespace) -> dict:
    from bench.measure import Plan, default_sizes, measure

    capture, steps, reps, seq_len = PLANS[(name, args.quick)]
    plan = Plan(capture or default_sizes(), steps, args.reps or reps, seq_len)
    return measure(name, plan, progress)


def run_child(name: str, args: argparse.Namespace) -> dict:
    """Measure one model in a fresh process (clean RSS baseline); progress goes to our stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", "bench.graph_bench", "--model", name, "--threads", str(args.threads),
               "--child-out", str(out)] + (["--quick"] if args.quick else []) + \
              (["--reps", str(args.reps)] if args.reps else []) + [f"--paddle-flag={f}" for f in args.paddle_flag]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.read_text())


def describe_machine(args: argparse.Namespace) -> dict:
    return machine.describe(args.threads)  # imports paddle: only after OMP_NUM_THREADS is set


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
