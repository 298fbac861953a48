"""Rank program for cases/test_launch.py: all_reduce of scale * (rank + 1), saved by each rank.

usage: allreduce.py OUT_DIR [--scale S] [--exit-rank R --exit-code C [--hard]] [--hang-rank R] [--watchdog T]

Writes OUT_DIR/rank{R}.npz with `value` (the reduced [3] vector) and `world`. A planted failure
happens after init_parallel_env and before the all_reduce, so the peers are left waiting in it.
`--hard` exits through os._exit (no Python unwinding, like a killed rank): the peers then fail on
the broken connection within milliseconds. `--watchdog T` sums through the engine's `Collectives`
under a collective watchdog of T seconds (engine/launch/watchdog.py), as an engine's ranks do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

from engine.distributed import Collectives
from engine.launch import watchdog
from engine.launch.rank_entry import wait_for_store


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--exit-rank", type=int, default=-1)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--hard", action="store_true")
    parser.add_argument("--hang-rank", type=int, default=-1)
    parser.add_argument("--watchdog", type=float, default=0.0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    wait_for_store()  # engine/launch/rank_entry.py: no 3 s retry at the start
    dist.init_parallel_env()
    rank = dist.get_rank()
    if rank == args.exit_rank:
        print(f"rank {rank} exits with code {args.exit_code} on purpose", flush=True)
        if args.hard:
            os._exit(args.exit_code)
        sys.exit(args.exit_code)
    if rank == args.hang_rank:
        print(f"rank {rank} hangs on purpose", flush=True)
        while True:
            time.sleep(60)
    value = paddle.full([3], args.scale * (rank + 1), dtype="float32")
    if args.watchdog:
        comm = Collectives(dist.get_world_size(), watchdog=watchdog.for_rank(rank, args.watchdog))
        comm.begin_step()
        comm.all_reduce(value, "the program's sum")
    else:
        dist.all_reduce(value)
    np.savez(args.out_dir / f"rank{rank}.npz", value=value.numpy(), world=dist.get_world_size())


if __name__ == "__main__":
    main(sys.argv[1:])
