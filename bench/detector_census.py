"""Detector census: how many independent cases catch each planted bug class.

`python -m verifier selftest` stops each planted run at its first failure: it proves every
failpoint is caught, not by how many cases. A class caught by one case is one careless edit away
from being missed. This runs the selftest in census mode (`--census`: no `-x`, no shrinking, every
failing case recorded) and counts, per failpoint, the distinct failing case functions (the
parametrisations of one function count once) and the files they are in.

A full census (26 failpoints x the whole gate, run to the end) costs more than the gate many times
over, so each failpoint runs only the case files that can see its area: the files that build an
engine, call the router or start a rank job with the run's `--failpoints` (found by grepping cases/
for the `faults` and `engine_for` fixtures, `LLM(` and the rank pool), narrowed by what the area
changes (`CENSUS_FILES`). A case file outside that list that would also fail is not counted: the
counts are lower bounds.

    nice -n 10 python -m bench.detector_census --only graph.copy_outputs rotary.chunk_positions_from_zero
    nice -n 10 python -m bench.detector_census --fast     # the selftest's FAST_SUBSET

Writes bench/results/detector-census-<date>.json (the selftest's JSON, with every failing node id)
and a .md table next to it. Never imported by the gate's cases.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from verifier.selftest import CASES, Outcome, census_rows, markdown, run_planted, select, write_json

RESULTS = Path(__file__).resolve().parent / "results"

# Files whose engines are built with eager and graph paths on the run's faults (and the second
# detectors, cases/test_second_*.py, added to every area that has one).
_ENGINES = ("test_batching.py", "test_graph.py", "test_golden.py", "test_seed_regression.py")
_GRAPH = ("test_graph_toy.py", "test_graph.py", "test_moe_forms.py", "test_seed_regression.py",
          "test_verifier_cli.py", "test_user_model.py")
CENSUS_FILES: dict[str, tuple[str, ...]] = {
    "router": ("test_router.py", "test_seed_regression.py", "test_golden.py", "test_moe_forms.py",
               "test_config_fields.py"),
    "moe": _GRAPH,
    "attention": (*_ENGINES, "test_user_model.py"),
    "rotary": (*_ENGINES, "test_user_model.py", "test_truth_positions.py", "test_float64.py"),
    "kv": (*_ENGINES, "test_user_model.py", "test_verifier_cli.py"),
    "graph": _GRAPH,
    "dist": ("test_parallel.py", "test_cli_ranks.py", "test_routing_replay_ranks.py", "test_watchdog.py"),
    "norm": ("test_truth_modes.py", "test_graph.py", "test_moe_forms.py"),
    "r3": ("test_routing_replay_recorder.py", "test_routing_replay_store.py", "test_routing_replay_engine.py",
           "test_probes_replay.py", "test_routing_replay_ranks.py"),
    "prefix": ("test_prefix_cache.py", "test_prefix_gate.py"),
}


def census_files(failpoint: str, cases: Path = CASES) -> list[str]:
    """The case files a census of `failpoint` runs: its area's, then the second detectors."""
    area = failpoint.split(".")[0]
    if area not in CENSUS_FILES:
        raise KeyError(f"failpoint {failpoint!r}: area {area!r} has no entry in CENSUS_FILES")
    seconds = sorted(p.name for p in cases.glob("test_second_*.py"))
    return [f for f in CENSUS_FILES[area] if (cases / f).exists()] + seconds


def merged(paths: list[Path]) -> tuple[list[Outcome], dict]:
    """The outcomes and per-failpoint file lists of several census JSONs (runs made one failpoint
    at a time, so a cut session keeps what finished), in the order given; a failpoint censused
    again in a later file replaces its earlier entry in place."""
    outcomes: dict[str, Outcome] = {}
    files: dict[str, list[str]] = {}
    for path in paths:
        document = json.loads(path.read_text())
        files |= document["settings"]["files"]
        for entry in document["failpoints"]:
            outcomes[entry["failpoint"]] = Outcome(**{k: v for k, v in entry.items() if k != "reproduce"})
    return list(outcomes.values()), files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.detector_census", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="census of these failpoints")
    parser.add_argument("--fast", action="store_true", help="the selftest's FAST_SUBSET")
    parser.add_argument("--jobs", type=int, default=1, help="planted runs at once (default 1)")
    parser.add_argument("-n", "--workers", type=int, default=2, help="xdist workers per run (default 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is cut (partial)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: merge these census JSONs into --out and its table")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/detector-census-<date>.json)")
    args = parser.parse_args(argv)
    out = args.out or RESULTS / f"detector-census-{time.strftime('%Y%m%d-%H%M')}.json"
    if args.merge:
        outcomes, files = merged(args.merge)
        write_json(out, None, outcomes, {"profile": "ci", "census": True, "files": files})
        out.with_suffix(".md").write_text(markdown(outcomes, census=True))
        print(markdown(outcomes, census=True))
        return 0
    names = select(args.only, args.fast)
    workdir = Path(tempfile.mkdtemp(prefix="graphgate-census-"))
    print(f"census of {len(names)} failpoint(s); logs in {workdir}", flush=True)

    def progress(outcome) -> None:
        print(" | ".join(census_rows([outcome])[0]), f"| {outcome.seconds:.0f} s", flush=True)

    outcomes = run_planted(names, args.jobs, args.workers, "ci", args.timeout, workdir, CASES, progress,
                           census_files, census=True)
    settings = {"jobs": args.jobs, "workers": args.workers, "profile": "ci", "census": True,
                "files": {name: census_files(name) for name in names}}
    write_json(out, None, outcomes, settings)
    out.with_suffix(".md").write_text(markdown(outcomes, census=True))
    print(markdown(outcomes, census=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
