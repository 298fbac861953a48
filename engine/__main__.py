"""`python -m engine run`: run a prompts file through a checkpoint and optionally dump every output.

Environment variables: ENGINE_FAILPOINTS (comma-separated failpoint names), the default of
--failpoints, and ENGINE_COLLECTIVE_TIMEOUT (seconds), the default of --collective-timeout, are
read here; the launcher's own variables (which rank this process is, in a multi-rank job) only in
engine/launch/rank_entry.py. No other engine module reads the environment.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
import warnings

from engine.config import CaptureTiming, GraphBackend, GraphMode, MoEForm, ParallelConfig
from engine.errors import ConfigError, UserError
from engine.launch import cli_job
from engine.launch.nodes import START_PORT, from_flags
from engine.launch.ports import check_free, check_start_port
from engine.threads import set_threads


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
    run.add_argument("--moe-form", choices=_values(MoEForm), default=MoEForm.SPARSE.value,
                     help="sparse: rows grouped by expert, exact counts eagerly, a fixed capacity in graphs "
                          "(engine/moe/experts.py), the fast path; dense: every expert on every row, masked, "
                          "the reference (default sparse)")
    run.add_argument("--threads", type=int, metavar="N",
                     help="CPU kernel threads per process (default: $OMP_NUM_THREADS or $MKL_NUM_THREADS when "
                          "set, else this machine's CPUs, shared between ranks)")
    run.add_argument("--graph", choices=_values(GraphMode), default=GraphMode.EAGER.value,
                     help="eager: no graphs; piecewise: replay the pieces between attention ops, captured per "
                          "padded token count; full_and_piecewise: pure-decode steps replay one whole-model "
                          "graph (default eager)")
    run.add_argument("--capture-sizes", type=_sizes, metavar="S1,S2,...",
                     help="prefill/mixed capture sizes (default: a 4..8192 ladder cut at the token budget)")
    run.add_argument("--decode-capture-sizes", type=_sizes, metavar="S1,S2,...",
                     help="decode capture sizes (default: 1,2,4,8,16,... up to --max-num-seqs)")
    run.add_argument("--graph-backend", choices=_values(GraphBackend), default=GraphBackend.AUTO.value,
                     help="auto: CUDA graphs on a CUDA build, else static programs (default auto)")
    run.add_argument("--capture", choices=_values(CaptureTiming), default=CaptureTiming.LAZY.value,
                     help="capture each size on first use (lazy) or all sizes at start-up (eager)")
    run.add_argument("--tp", type=int, default=1, metavar="N",
                     help="tensor-parallel ranks; N > 1 starts an N-rank job through paddle.distributed.launch "
                          "(gloo on CPU, NCCL on GPU) unless already started by the launcher (default 1)")
    run.add_argument("--ep", type=int, default=1, metavar="N",
                     help="expert parallelism: 1 (experts split by width over the TP ranks) or equal to --tp "
                          "(experts placed on ranks) (default 1)")
    run.add_argument("--nnodes", type=int, default=1, metavar="N",
                     help="hosts the --tp ranks are spread over, evenly; run the same command on each host "
                          "(paddle.distributed.launch --nnodes; rank 0's host serves --start-port) (default 1)")
    run.add_argument("--ips", metavar="A,B,...",
                     help="with --nnodes N: the N hosts' addresses, rank 0's host first; this host must hold "
                          "exactly one of them (paddle.distributed.launch --ips)")
    run.add_argument("--start-port", type=int, metavar="P", default=None,
                     help="with --tp N > 1: rank 0 serves the job's store on port P and the launcher assigns "
                          "the next ones to this host's other ranks; the same P on every host (default: a free "
                          f"port drawn at random on one node, {START_PORT} over several)")
    run.add_argument("--dump-all-ranks", action="store_true",
                     help="with --dump OUT.npz, also write OUT.rank{R}.npz from every rank")
    run.add_argument("--routing-replay-dir", metavar="DIR",
                     help="record each request's routed experts to DIR/<prompt name>.safetensors (rank 0 writes)")
    run.add_argument("--replay-routing", metavar="DIR",
                     help="route every token by the experts recorded in DIR (by --routing-replay-dir), "
                          "weights recomputed from the router's scores")
    run.add_argument("--collective-timeout", type=float, metavar="S", default=None,
                     help="with --tp N > 1: a rank that waits longer than S seconds in one collective (plus "
                          "slack for the work it has just done) is named with its step and collective and "
                          "ended; 0: no bound (default: $ENGINE_COLLECTIVE_TIMEOUT, else "
                          f"{ParallelConfig.collective_timeout_s:g})")
    run.add_argument("--start-timeout", type=float, metavar="S", default=None,
                     help="with --nnodes N > 1: end the job, naming this node and the peers that never "
                          "arrived, when this host's ranks have not all joined it within S seconds; 0: no "
                          f"bound (default: {cli_job.START_TIMEOUT_PER_COLLECTIVE_TIMEOUT:g} x the collective "
                          "timeout)")
    run.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                     help="compute dtype of weights, activations, KV cache and dump (float64: to compare "
                          "against a float64 reference; default float32)")
    run.add_argument("--prefix-caching", choices=("on", "off"), default="on",
                     help="on: requests whose prompts start alike share the KV of the full blocks they have in "
                          "common (not with --dump, whose prompt logits need every position computed); the "
                          "summary says how many prompt tokens were reused (default on)")
    run.add_argument("--log-dir", metavar="DIR", help="where a multi-rank job keeps its logs (default: a temp dir)")
    run.add_argument("--report-dir", help=argparse.SUPPRESS)  # set by the parent of a multi-rank job
    run.add_argument("--failpoints", default=os.environ.get("ENGINE_FAILPOINTS", ""), metavar="NAMES",
                     help="comma-separated faults to plant, for testing the gate (default: $ENGINE_FAILPOINTS)")
    run.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return parser


def _values(choice: type) -> tuple[str, ...]:
    """An enum's values as argparse choices (plain strings, so --help lists them as users type them)."""
    return tuple(member.value for member in choice)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def engine_config(args: argparse.Namespace):
    from engine.config import ConfigError, EngineConfig, GraphConfig
    from engine.failpoints import Failpoints

    try:
        faults = Failpoints.parse(args.failpoints)
    except ValueError as err:
        raise ConfigError(f"--failpoints: {err}") from None
    graph = GraphConfig(mode=args.graph, backend=args.graph_backend, prefill_capture_sizes=args.capture_sizes,
                        decode_capture_sizes=args.decode_capture_sizes, capture=args.capture)
    timeout = args.collective_timeout if args.collective_timeout is not None else _timeout_from_env()
    parallel = ParallelConfig(tp=args.tp, ep=args.ep, collective_timeout_s=timeout)
    return EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                        graph=graph, parallel=parallel, faults=faults, moe_form=args.moe_form,
                        dtype=args.dtype, prefix_caching=args.prefix_caching == "on")


def run(args: argparse.Namespace, out=None) -> int:
    from engine.dump import dump_arrays, write_dump
    from engine.llm import LLM
    from engine.prompts import read_prompts

    out = out or sys.stdout
    engine = engine_config(args)
    prompts = read_prompts(args.prompts)
    start = time.perf_counter()
    llm = LLM(args.model, engine, routing_replay_dir=args.routing_replay_dir, replay_routing_dir=args.replay_routing)
    outputs = llm.generate(prompts, args.max_new_tokens, record_prompt_logits=bool(args.dump))
    elapsed = time.perf_counter() - start
    for result in outputs:
        print(f"{result.name}: {' '.join(map(str, result.greedy))}", file=out)
    rank = llm.model.partition.rank
    if args.dump:
        arrays = dump_arrays(outputs, llm.model_config.moe_layers)
        if rank == 0:
            print(f"wrote {write_dump(args.dump, arrays)}", file=sys.stderr)
        if args.dump_all_ranks:
            write_dump(args.dump.removesuffix(".npz") + f".rank{rank}.npz", arrays)
    print(f"{len(outputs)} prompts, {args.max_new_tokens} new tokens each, {elapsed:.2f} s", file=sys.stderr)
    print(f"moe form {engine.moe_form}; process set-up: {llm.setup.describe()}", file=sys.stderr)
    print(llm.engine.faults.announcement(), file=sys.stderr)  # what reached this engine (cases check it)
    if engine.graph.mode is not GraphMode.EAGER:
        print(f"graphs: {llm.runner.stats.summary()}", file=sys.stderr)
    if rank == 0:  # every rank makes the same hit decisions (checked each step)
        print(llm.prefix_summary(), file=sys.stderr)
    if llm.routing is not None and rank == 0:
        _print_routing_files(llm.routing.files, args.routing_replay_dir)
    return 0


def _print_routing_files(files: list, directory: str) -> None:
    print(f"routing replay: {len(files)} files in {directory}", file=sys.stderr)
    for path in files:
        print(f"  {path}", file=sys.stderr)


def _timeout_from_env() -> float:
    """--collective-timeout's default: $ENGINE_COLLECTIVE_TIMEOUT when set (an error naming it when
    it is not a number), else ParallelConfig's."""
    text = os.environ.get("ENGINE_COLLECTIVE_TIMEOUT")
    if text is None:
        return ParallelConfig.collective_timeout_s
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"ENGINE_COLLECTIVE_TIMEOUT={text!r}: not a number of seconds") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if (args.tp > 1 or args.nnodes > 1) and not cli_job.inside_launched_job():
        return _relaunch(args, argv)
    warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's import-time build notice
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.capture == CaptureTiming.EAGER.value and not args.verbose:  # long work shows progress
        logging.getLogger("engine.graph.runner").setLevel(logging.INFO)
    try:  # without --threads, the engine's set-up (LLM, engine/threads.py) decides, after the user's env
        if args.threads is not None:
            set_threads(args.threads, ranks=args.tp)
    except ValueError as err:
        print(f"error: --threads: {err}", file=sys.stderr)
        return 2
    if args.report_dir:
        return _run_as_rank(args)
    try:
        return run(args)
    except UserError as err:  # bad input: one line, exit 2; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


def _relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        engine = engine_config(args)  # refuse a bad configuration before starting any rank
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        nodes = from_flags(args.nnodes, args.ips)
        per_node = nodes.per_node(args.tp)
        if args.start_port is not None:
            check_start_port(args.start_port, per_node)
            if nodes.this == 0:  # the host that serves the store
                check_free(args.start_port)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start_s = args.start_timeout if args.start_timeout is not None else \
        cli_job.START_TIMEOUT_PER_COLLECTIVE_TIMEOUT * engine.parallel.collective_timeout_s
    if start_s < 0:
        print(f"error: --start-timeout must be >= 0 seconds (0: no bound), got {start_s:g}", file=sys.stderr)
        return 2
    return cli_job.relaunch(argv, args.tp, args.log_dir, engine.faults, nodes,
                            start_timeout_s=start_s if nodes.multi and start_s > 0 else None,
                            start_port=args.start_port)


def _run_as_rank(args: argparse.Namespace) -> int:
    """One rank of a job this CLI started: report output or error to the parent through files."""
    output = io.StringIO()
    try:
        code = run(args, out=output)
    except UserError as err:
        cli_job.write_report(args.report_dir, f"error: {err}\n", error=True)
        return 2
    cli_job.write_report(args.report_dir, output.getvalue(), error=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
