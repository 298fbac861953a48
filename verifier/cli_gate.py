"""gate: run the gate's cases (pytest + xdist underneath) and print one report.

Runs the bundled cases/ on the bundled checkpoints; each `--model DIR` adds a Hugging Face
checkpoint folder that cases/test_user_model.py runs the battery on: every area of the gate that
applies to it (its report has a section per model). A folder without config.json, or of a
model_type the engine does not run, is refused by name before any case starts (exit 2). Progress is the plugin's
(`--gate-progress auto`, verifier/progress.py: a rich bar on a terminal, plain lines in a log,
instead of pytest's marks); the report follows, then the artifacts are written.
Anything after `--` goes to pytest unchanged (e.g. `-- -k graph`).

`--shard I/N` runs one deterministic part of the cases (verifier/shards.py: xdist groups whole,
balanced by cases/durations.json); its report records the shard and the whole collection, and
`python -m verifier merge-reports` joins the N reports into the verdict the unsharded gate gives.

Exit codes: 0 every case passed; 1 a divergence (a case failed); 2 the gate could not run (bad
arguments, a missing dependency, a case that could not start, such as a rank that did not come up,
or pytest itself stopping).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from verifier.report import read_json

ROOT = Path(__file__).resolve().parent.parent  # the checkout: cases/, fixtures/, conftest.py
PROFILES = ("ci", "dev", "nightly")
REQUIRED = ("paddle", "numpy", "safetensors", "rich", "hypothesis", "pytest")
VERDICT_EXIT = {"pass": 0, "divergence": 1, "could not run": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=PROFILES, default="ci",
                        help="hypothesis profile: ci (default, deterministic), dev, nightly (thousands of examples)")
    parser.add_argument("-n", dest="workers", type=_workers, default=4, metavar="WORKERS",
                        help="xdist worker processes (default 4; 0 runs in this process)")
    parser.add_argument("--model", action="append", default=[], metavar="DIR",
                        help="also gate this checkpoint folder (config.json + safetensors); repeatable")
    parser.add_argument("--failpoints", default="", metavar="NAMES",
                        help="plant these engine failpoints (engine/failpoints.py): the gate must then fail")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (schema: verifier/report.py)")
    parser.add_argument("--junitxml", metavar="PATH", help="write pytest's JUnit XML, comparisons as properties")
    parser.add_argument("--html", metavar="PATH", help="write the report as HTML")
    parser.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                        help="run only shard I of N (merge the N reports with `python -m verifier merge-reports`)")
    parser.add_argument("--shard-durations", metavar="PATH",
                        help="durations file the shards are balanced by (default: cases/durations.json)")
    parser.add_argument("--cases", nargs="+", default=None, metavar="PATH",
                        help="case files or folders to run instead of the bundled cases/")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST_ARGS",
                        help="extra pytest arguments, after `--`")


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-n {text!r}: want a whole number of workers") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"-n {value}: want 0 or more workers")
    return value


def _shard(text: str) -> str:
    from verifier.shards import Shard

    try:
        return str(Shard.parse(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    problem = check_setup(args)
    if problem:
        print(f"error: gate: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="graphgate-") as scratch:
        json_path = args.json or str(Path(scratch) / "report.json")
        code = subprocess.call(pytest_command(args, json_path), cwd=ROOT, env=_env())
        return exit_code(code, json_path)


def check_setup(args: argparse.Namespace) -> str | None:
    """The first reason the gate cannot start, as one line; None when it can."""
    needed = REQUIRED + (("xdist",) if args.workers else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        return f"missing dependency {', '.join(missing)} (install the project: pip install -e .)"
    for model in args.model:
        problem = model_problem(model)
        if problem:
            return problem
    if args.shard_durations and not Path(args.shard_durations).is_file():
        return f"--shard-durations {args.shard_durations}: no such file"
    for path in args.cases or ():
        if not Path(path).exists():
            return f"--cases {path}: no such file or folder"
    if args.cases is None and not (ROOT / "cases").is_dir():
        return f"no cases folder at {ROOT / 'cases'}: install from a checkout (pip install -e .) or pass --cases"
    if args.pytest_args and args.pytest_args[0] != "--":
        return f"unexpected argument {args.pytest_args[0]!r} (pytest arguments go after `--`)"
    return _check_failpoints(args.failpoints)


# config.json model_type -> the architecture the engine runs it as (engine/config.py).
MODEL_TYPES = {"glm4_moe": "Glm4MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def model_problem(model: str | Path) -> str | None:
    """Why the battery cannot gate this checkpoint folder, naming the file, field and value; None
    when it can. Checked before any case runs (here, and at collection when pytest is run alone)."""
    import json

    from engine.errors import UserError
    from engine.hf_config import read_model_config

    config = Path(model) / "config.json"
    if not config.is_file():
        return f"--model {model}: no config.json in that folder"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        return f"--model {model}: {config} is not a JSON object ({err})"
    if model_type not in MODEL_TYPES:
        return (f"--model {model}: {config} field 'model_type': {model_type!r} is not supported "
                f"(supported: {', '.join(MODEL_TYPES)})")
    try:
        read_model_config(model)
    except UserError as err:
        return f"--model {model}: {err}"
    return None


def _check_failpoints(text: str) -> str | None:
    from engine.failpoints import KNOWN

    unknown = sorted({n.strip() for n in text.split(",") if n.strip()} - KNOWN.keys())
    return f"--failpoints: unknown {unknown}; known: {sorted(KNOWN)}" if unknown else None


def pytest_command(args: argparse.Namespace, json_path: str) -> list[str]:
    """The pytest run behind the gate: quiet progress, no tracebacks (the report replaces them)."""
    cases = [str(Path(p).resolve()) for p in args.cases] if args.cases else [str(ROOT / "cases")]
    command = [sys.executable, "-m", "pytest", *cases, "-q", "--tb=no", "-p", "verifier.plugin",
               "--hypothesis-profile", args.profile, "--report-json", str(Path(json_path).resolve()),
               "--gate-progress", "auto"]
    if args.workers:
        command += ["-n", str(args.workers)]
    if args.failpoints:
        command += ["--failpoints", args.failpoints]
    for model in args.model:
        command += ["--model", str(Path(model).resolve())]
    if args.junitxml:
        command += ["--junitxml", str(Path(args.junitxml).resolve())]
    if args.html:
        command += ["--report-html", str(Path(args.html).resolve())]
    if args.shard:
        command += ["-p", "verifier.shard_plugin", "--shard", args.shard]
        if args.shard_durations:
            command += ["--shard-durations", str(Path(args.shard_durations).resolve())]
    return command + args.pytest_args[1:]


def exit_code(pytest_code: int, json_path: str) -> int:
    """0 / 1 / 2 from the report's verdict; 2 when pytest stopped (usage, internal error, interrupt)
    or wrote no report."""
    if pytest_code not in (0, 1) or not Path(json_path).is_file():
        print(f"error: gate: pytest stopped with exit code {pytest_code} before the cases ran to the end",
              file=sys.stderr)
        return 2
    return VERDICT_EXIT[read_json(json_path).verdict()]


def _env() -> dict[str, str]:
    """The child sees this checkout first on its path (cases import engine, verifier, fixtures)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env
