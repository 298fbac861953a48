"""How many 4-rank comparisons a minute the gate gets by reusing started ranks.

`python -m bench.rank_pool_bench [--requests N]` starts the 4-rank engine server of
cases/test_parallel.py once, then times N requests per layout and mode on the default prompts
(each request is one 4-rank run that a case compares with a 1-rank run). Prints start-up time,
per-request medians and comparisons per minute. Never imported by tests.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from fixtures.pytest_fixtures import default_prompts
from verifier.rank_pool import RankPool

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(ROOT / "cases" / "rank_programs" / "engine_server.py")


def payload(layout: tuple[int, int], mode: str, prompts) -> dict:
    graph = {"capture_sizes": [128], "decode_capture_sizes": [4]} if mode != "eager" else {}
    return {"checkpoint": "glm4_moe", "tp": layout[0], "ep": layout[1], "mode": mode, "max_new_tokens": 8,
            "prompts": [list(p.input_ids) for p in prompts], **graph}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10, help="timed requests per layout and mode")
    args = parser.parse_args()
    prompts = default_prompts()
    started = time.monotonic()
    with RankPool([SERVER], 4, env={"PYTHONPATH": str(ROOT)}, start_timeout_s=300, request_timeout_s=300) as pool:
        print(f"pool start: {time.monotonic() - started:.1f} s")
        for layout in ((4, 1), (4, 4)):
            for mode in ("eager", "piecewise"):
                first = time.monotonic()
                pool.request(payload(layout, mode, prompts))  # loads weights, captures graphs
                warm = time.monotonic() - first
                times = []
                for _ in range(args.requests):
                    t = time.monotonic()
                    pool.request(payload(layout, mode, prompts))
                    times.append(time.monotonic() - t)
                median = statistics.median(times)
                print(f"tp{layout[0]} ep{layout[1]} {mode:9s}: first {warm:5.1f} s, then median {median:.2f} s "
                      f"-> {60 / median:.0f} comparisons/min")


if __name__ == "__main__":
    main()
