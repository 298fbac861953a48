"""Issue 16's yardsticks in one run: JSON in bench/results/ and the table in bench/README.md.

    nice -n 10 python -m bench.issue16 [--quick]

Runs, in one process and at the engine's thread setting (engine/threads.py): the MoE forms at
128 experts top-8, attention forms on the fixture's shapes, the prefill step of the real-shape
synthetic config against the matmul ceiling, and the thread-count comparison. The README section
between the two markers is rewritten from the JSON; nothing else in the file is touched.
"""

from __future__ import annotations

import argparse
import json
import time

from bench import attention_forms, moe_forms, prefill_ceiling, threads_bench
from bench.machine import ROOT
from engine.threads import set_threads

README = ROOT / "bench" / "README.md"
BEGIN, END = "<!-- issue16:begin -->", "<!-- issue16:end -->"


def run(quick: bool) -> dict:
    threads = set_threads(None)
    results = {"threads": threads, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    results["moe"] = moe_forms.measure(tokens=1024 if quick else 4096, hidden=512, inter=128, repeat=2)
    results["attention"] = [attention_forms.measure(n, repeat=2) for n in ((512, 2048) if quick else (512, 2048, 8192))]
    results["prefill"] = prefill_ceiling.measure(tokens=2048 if quick else 8192, hidden=512)
    results["thread_counts"] = threads_bench.measure(repeat=1 if quick else 2)
    set_threads(threads)
    return results


def table(r: dict) -> str:
    moe, pre = r["moe"], r["prefill"]
    att = r["attention"][-1]
    rows = [
        ("MoE block, 128 experts top-8, {tokens} tokens (H {hidden}, I {moe_intermediate})".format(**moe),
         ">= 8x dense", f"{moe['speedup']:.1f}x (dense {moe['dense_s']:.2f} s, sparse eager {moe['sparse_s']:.2f} s, "
                        f"sparse at graph capacity {moe['capacity_s']:.2f} s, max abs diff {moe['max_abs_err']:.1e})"),
        (f"Attention, fixture shapes, {att['tokens']} tokens", ">= 3x the loop",
         f"{att['speedup']:.2f}x (loop {att['loop_s']:.3f} s, batched {att['batched_s']:.3f} s, "
         f"max abs diff {att['max_abs_diff']:.1e})"),
        (f"Prefill {pre['tokens']} tokens, real expert shapes (H {pre['hidden']}, sparse MoE)",
         ">= 50% of the matmul ceiling outside attention",
         f"{100 * pre['fraction_of_ceiling_outside_attention']:.0f}% (ceiling {pre['ceiling_gflops']:.1f} GFLOP/s, "
         f"step {pre['step_s']:.2f} s of which attention {pre['attention_s']:.2f} s)"),
    ]
    t = r["thread_counts"]
    counts = sorted({int(k.split("@")[1]) for k in t})
    for count in counts:
        rows.append((f"{count} thread(s): GEMM 4096x1024x1024 / sparse MoE 1024 tok / dense MoE", "-",
                     f"{t[f'gemm_4096x1024x1024_s@{count}']:.3f} / {t[f'moe_sparse_s@{count}']:.3f} / "
                     f"{t[f'moe_dense_s@{count}']:.3f} s"))
    lines = [f"Run {r['started']}, {r['threads']} thread(s). Regenerate: `nice -n 10 python -m bench.issue16`.",
             "", "| yardstick | goal | measured |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def write_readme(r: dict) -> None:
    text = README.read_text()
    section = f"{BEGIN}\n{table(r)}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Issue 16 yardsticks\n\n" + section + "\n"
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for trying the command")
    args = parser.parse_args()
    results = run(args.quick)
    out = ROOT / "bench" / "results" / f"issue16-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json"
    out.write_text(json.dumps(results, indent=1))
    write_readme(results)
    print(f"wrote {out} and {README}")


if __name__ == "__main__":
    main()
