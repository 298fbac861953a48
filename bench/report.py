"""The benchmark's verdict on issue 3's goals, and the table printed at the end of a run."""

from __future__ import annotations

CAPTURE_SECONDS = 20.0  # the whole fixture ladder, 2 cores
MIN_SPEEDUP = 1.0  # piecewise at least as fast as eager at every size
BIG_STEP, BIG_SPEEDUP = 512, 1.3  # and 1.3x from 512 tokens up
OVERHEAD_SIZE, MAX_OVERHEAD_PCT = 8192, 5.0  # copy-in / copy-out under 5% of an 8192-token step


def goals(models: dict[str, dict]) -> list[dict]:
    """One entry per goal and model: holds (True, False, or None when not measured) and the evidence."""
    out = [_capture_goal(models.get("fixture"))]
    for name, result in models.items():
        steps = result["steps"]
        out += [_speed_goal(name, steps, 0, MIN_SPEEDUP), _speed_goal(name, steps, BIG_STEP, BIG_SPEEDUP),
                _overhead_goal(name, steps)]
    return out


def _capture_goal(fixture: dict | None) -> dict:
    goal = f"fixture: capture the whole 4..8192 prefill ladder in < {CAPTURE_SECONDS:.0f} s"
    if fixture is None:
        return {"goal": goal, "holds": None, "evidence": "fixture not measured"}
    cap = fixture["capture"]
    evidence = f"{cap['sizes']} sizes in {cap['seconds']} s wall, {cap['cpu_seconds']} s CPU"
    if not cap["full_ladder"]:
        per_size = cap["seconds"] / cap["sizes"]
        return {"goal": goal, "holds": None, "evidence": f"{evidence} (subset; about {per_size:.1f} s per size)"}
    return {"goal": goal, "holds": cap["seconds"] < CAPTURE_SECONDS, "evidence": evidence}


def _speed_goal(name: str, steps: list[dict], from_size: int, least: float) -> dict:
    rows = [r for r in steps if r["size"] >= from_size]
    goal = f"{name}: piecewise >= {least}x eager" + (f" from {from_size} tokens up" if from_size else " at every size")
    if not rows:
        return {"goal": goal, "holds": None, "evidence": "no step of that size measured"}
    failing = [f"{r['tokens']}: {r['speedup']}x" for r in rows if r["speedup"] < least]
    worst = min(rows, key=lambda r: r["speedup"])
    evidence = f"worst {worst['speedup']}x at {worst['tokens']} tokens" + \
               (f"; below at {', '.join(failing)}" if failing else "")
    return {"goal": goal, "holds": not failing, "evidence": evidence}


def _overhead_goal(name: str, steps: list[dict]) -> dict:
    rows = [r for r in steps if r["size"] == OVERHEAD_SIZE]
    goal = f"{name}: graph-path overhead (copy-in, padding, copy-out) < {MAX_OVERHEAD_PCT:.0f}% of an " \
           f"{OVERHEAD_SIZE}-token step"
    if not rows:
        return {"goal": goal, "holds": None, "evidence": f"no {OVERHEAD_SIZE}-token step measured"}
    evidence = "; ".join(f"{r['tokens']} tokens: {r['overhead_pct']}% ({r['graph_ms']['copy_in']:.1f} ms in, "
                         f"{r['graph_ms']['copy_out']:.1f} ms out of {r['piecewise_ms']:.0f} ms)" for r in rows)
    return {"goal": goal, "holds": all(r["overhead_pct"] < MAX_OVERHEAD_PCT for r in rows), "evidence": evidence}


# ---------------------------------------------------------------------------------------------
# Rendering

COLUMNS = (("tokens", 6), ("size", 5), ("eager ms", 9), ("piece ms", 9), ("eager tok/s", 11),
           ("piece tok/s", 11), ("speedup", 7), ("paired", 11), ("cpu x", 5), ("no-attn", 7), ("attn ms", 8),
           ("in ms", 7), ("out ms", 7), ("ovh %", 6), ("equal", 8))


LEGEND = ("speedup = eager / piecewise median step; paired = min..max of per-repetition ratios; cpu x = the same "
          "ratio in process CPU time (steadier on a shared machine); no-attn = speedup without the (shared, eager) "
          "attention; in / out = copy into the static input buffers / into the output buffers; ovh = (in + out) / "
          "step; equal = final hidden states bitwise equal (else their max abs difference)")


def render(result: dict) -> str:
    lines = [_machine_line(result["machine"], result)]
    for name, model in result["models"].items():
        lines += ["", _model_line(name, model), _capture_line(model), _header()]
        lines += [_row(r) for r in model["steps"]]
    lines += ["", "goals (issue 3, Speed and memory):"]
    lines += [f"  [{_verdict(g['holds'])}] {g['goal']}: {g['evidence']}" for g in result["goals"]]
    lines += ["", LEGEND]
    return "\n".join(lines)


def _machine_line(m: dict, result: dict) -> str:
    git = m.get("git") or {}
    commit = f", engine at {git['commit'][:10]}{' (dirty)' if git.get('engine_dirty') else ''}" if git else ""
    return (f"machine: {m['cpu']}, {m['nproc']} CPUs, OMP_NUM_THREADS={m['omp_num_threads']}, paddle {m['paddle']}, "
            f"load average {m['load_average_at_start'][0]} at start, {m['load_average_at_end'][0]} at end{commit}; "
            f"{'quick' if result['quick'] else 'full'} run, {result['wall_seconds']} s"
            + (f"; Paddle flags {' '.join(result['paddle_flags'])}" if result.get("paddle_flags") else "")
            + (f"; note: {result['note']}" if result.get("note") else ""))


def _model_line(name: str, model: dict) -> str:
    c = model["model"]
    return (f"{name}: hidden {c['hidden_size']}, {c['num_layers']} layers (MoE {list(c['moe_layers'])}), "
            f"{c['num_experts']} experts top-{c['top_k']} width {c['moe_intermediate_size']}, heads "
            f"{c['num_heads']}/{c['num_kv_heads']}x{c['head_dim']}; steps of {model['seq_len']}-token sequences, "
            f"median of {model['reps']}; peak RSS {model['peak_rss_mib']} MiB")


def _capture_line(model: dict) -> str:
    cap = model["capture"]
    kind = "the whole ladder" if cap["full_ladder"] else "a subset"
    rest = sorted(row["seconds"] for row in cap["per_size"][1:])
    typical = f", then a median {rest[len(rest) // 2]:.2f} s per size" if rest else ""
    first = cap["per_size"][0]
    return (f"capture: {cap['sizes']} sizes ({kind}) in {cap['seconds']} s wall, {cap['cpu_seconds']} s CPU "
            f"(size {first['size']} first: {first['seconds']:.2f} s{typical}); RSS {cap['rss_before_mib']} -> "
            f"{cap['rss_after_mib']} MiB (+{cap['rss_growth_mib']})"
            + (f", {cap['threads_after']} threads" if "threads_after" in cap else ""))


def _header() -> str:
    return "  ".join(title.rjust(width) for title, width in COLUMNS)


def _row(r: dict) -> str:
    paired = f"{r['paired_speedup_min_max'][0]:.2f}..{r['paired_speedup_min_max'][1]:.2f}"
    equal = "yes" if r["bitwise_equal"] else f"{r['max_abs_diff']:.1e}"
    cells = (r["tokens"], r["size"], f"{r['eager_ms']:.2f}", f"{r['piecewise_ms']:.2f}", r["eager_tok_s"],
             r["piecewise_tok_s"], f"{r['speedup']:.2f}", paired, f"{r['cpu_speedup']:.2f}",
             f"{r['pieces_speedup']:.2f}",
             f"{r['attention_ms']['piecewise']:.1f}", f"{r['graph_ms']['copy_in']:.2f}",
             f"{r['graph_ms']['copy_out']:.2f}", f"{r['overhead_pct']:.1f}", equal)
    return "  ".join(str(cell).rjust(width) for cell, (_, width) in zip(cells, COLUMNS))


def _verdict(holds: bool | None) -> str:
    return {True: "ok", False: "NO", None: "--"}[holds]
