"""Per-step CPU time of the engine's defaults and of transformers, on ONE thread: a loaded machine's proxy.

    OMP_NUM_THREADS=1 python -m bench.step_cpu_time [--out FILE]

On a shared machine wall times swing 2-10x with the other processes (bench/defaults_yardstick.py's
caveat), so A/B comparisons of a change are unreadable there. With one kernel thread a process's
CPU time (`time.process_time`) counts only its own work, not the time it waited for a core, so it
stays close to the idle wall time (cache contention still inflates it somewhat). This bench times
the yardstick's sizes (bench/defaults_yardstick.py: prefill 128 / 512 / 2048, decode batch 1 and 16
after 128 tokens) in CPU seconds, engine and transformers interleaved. Run it on two checkouts, in
alternation, to compare them (`PYTHONPATH=<checkout>`). Never imported by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import machine
from bench.defaults_yardstick import DECODE_BATCHES, DECODE_CONTEXT, PREFILL_TOKENS


def _cpu_wrapped(fn):
    """`fn` and a list that collects each call's CPU seconds."""
    spent = []

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.process_time() - start)

    return timed, spent


def engine_cpu(llm, ids: np.ndarray, steps: int) -> tuple[list[float], list[float]]:
    """(prefill step CPU seconds, decode step CPU seconds) of one run of `ids` through the scheduler."""
    from bench.hf_yardstick import engine_steps

    runner, original = llm.runner, llm.runner.step
    timed, spent = _cpu_wrapped(original)
    kinds = []

    def step(batch, **kwargs):
        kinds.append(any(s.is_prefill for s in batch.segments))
        return timed(batch, **kwargs)

    runner.step = step
    try:
        engine_steps(llm, ids, steps)
    finally:
        runner.step = original
    return [t for t, p in zip(spent, kinds) if p], [t for t, p in zip(spent, kinds) if not p]


def hf_cpu(model, ids: np.ndarray, steps: int) -> tuple[float, list[float]]:
    """(prefill CPU seconds, decode step CPU seconds) of transformers on `ids`."""
    import torch

    from bench.hf_yardstick import hf_prefill

    start = time.process_time()
    logits, cache = hf_prefill(model, ids)
    prefill = time.process_time() - start
    token, decode = logits[:, -1].argmax(-1), []
    with torch.inference_mode():
        for _ in range(steps - 1):
            start = time.process_time()
            out = model(input_ids=torch.from_numpy(token[:, None].astype(np.int64)), cache=cache, use_cache=True,
                        logits_to_keep=1)
            token = out.logits[:, -1].numpy().argmax(-1)
            decode.append(time.process_time() - start)
    return prefill, decode


def run(reps: int, decode_steps: int) -> dict:
    import torch

    from bench.hf_yardstick import ARCH, build_checkpoint, load_hf
    from engine.llm import LLM

    if os.environ.get("OMP_NUM_THREADS") != "1":
        raise SystemExit("run with OMP_NUM_THREADS=1: CPU time is a proxy for wall time on one thread only")
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="step-cpu-time-"))
    try:
        build_checkpoint(tmp, 64, max_positions=max(PREFILL_TOKENS) + 64)
        llm = LLM(tmp)
        torch.set_num_threads(1)
        hf = load_hf(tmp, None)
        out = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine.describe(1),
               "engine_setup": llm.setup.describe(), "clock": "process CPU seconds, one thread", "rows": []}
        for n in PREFILL_TOKENS:
            ids = rng.integers(0, ARCH["vocab_size"], (1, n))
            engine_cpu(llm, ids, 1), hf_cpu(hf, ids, 1)  # warm-up
            eng, ref = [], []
            for _ in range(reps):
                eng.append(engine_cpu(llm, ids, 1)[0][0])
                ref.append(hf_cpu(hf, ids, 1)[0])
            out["rows"].append({"measured": f"prefill {n}", "engine_s": min(eng), "transformers_s": min(ref)})
        for batch in DECODE_BATCHES:
            ids = rng.integers(0, ARCH["vocab_size"], (batch, DECODE_CONTEXT))
            engine_cpu(llm, ids, 3), hf_cpu(hf, ids, 3)
            eng, ref = [], []
            for _ in range(reps):
                eng += engine_cpu(llm, ids, decode_steps + 1)[1]
                ref += hf_cpu(hf, ids, decode_steps + 1)[1]
            out["rows"].append({"measured": f"decode batch {batch}", "engine_s": statistics.median(eng),
                                "transformers_s": statistics.median(ref)})
        for row in out["rows"]:
            row["ratio"] = round(row["engine_s"] / row["transformers_s"], 3)
        out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = run(args.reps, args.decode_steps)
    out["note"] = args.note
    for row in out["rows"]:
        print(f"{row['measured']:16s} engine {row['engine_s'] * 1e3:8.2f} ms CPU  transformers "
              f"{row['transformers_s'] * 1e3:8.2f} ms CPU  ratio {row['ratio']:.2f}")
    path = args.out or (machine.ROOT / "bench" / "results" /
                        f"step-cpu-time-{machine.slug(out['machine'])}-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
