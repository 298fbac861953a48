"""What breaks CUDA graph capture or replay, as data: the rules `verifier/capture_lint.py` applies.

A rule is a name, what it matches (a regular expression over Paddle PIR op names, or None for a
structural check the lint performs on the program or on the trace), why a piece that does this
cannot be captured or replays wrongly on a GPU, and a document that says so. The README's table of
rules is this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CUDA_CONSTRAINTS = "https://docs.nvidia.com/dl-cuda-graph/cuda-graph-basics/constraints.html"
CHECKLIST = "https://docs.nvidia.com/dl-cuda-graph/torch-cuda-graph/quick-checklist.html"
DYNAMIC = "https://docs.nvidia.com/dl-cuda-graph/torch-cuda-graph/handling-dynamic-patterns.html"
SILENT = "https://docs.nvidia.com/dl-cuda-graph/troubleshooting/numerical-errors.html"
NCCL_GRAPHS = "https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/usage/cudagraph.html"
PADDLE_GRAPHS = "https://github.com/PaddlePaddle/Paddle/blob/develop/python/paddle/device/cuda/graphs.py"


@dataclass(frozen=True)
class Rule:
    name: str
    ops: str | None  # full-match regex over op names ("pd_op.nonzero"); None: a structural check
    why: str
    doc: str

    def matches(self, op_name: str) -> bool:
        return self.ops is not None and re.fullmatch(self.ops, op_name) is not None


RULES: tuple[Rule, ...] = (
    Rule("data-dependent-shape",
         r"pd_op\.(nonzero|masked_select|unique|unique_consecutive|repeat_interleave_with_tensor_index|bincount"
         r"|histogram)",
         "the output's size depends on tensor values (one-argument where and boolean indexing lower to these): "
         "a graph records one launch per kernel with fixed sizes and addresses, so it needs the size on the "
         "host first, a device-to-host sync", DYNAMIC),
    Rule("dynamic-shape", None,
         "an op made a dimension that is unknown (-1) although every input of the piece has a fixed shape: the "
         "size comes from data", DYNAMIC),
    Rule("host-sync", r"pd_op\.(print|memcpy|memcpy_d2h|memcpy_h2d|assert)",
         "copies to or from the host, or waits for the device: a synchronous copy or host-device sync is "
         "prohibited during stream capture, and on replay the host side of it does not run", CUDA_CONSTRAINTS),
    Rule("host-read", None,
         "a tensor value was read or printed on the host while the piece was traced (.numpy(), .item(), "
         ".tolist(), int()/float()/bool(), print): on a GPU that is a blocking device-to-host copy, and the "
         "value read once is frozen into every replay", CHECKLIST),
    Rule("unseeded-random",
         r"pd_op\.(dropout|gaussian|uniform|bernoulli|multinomial|randint|randperm|truncated_gaussian_random"
         r"|exponential_|poisson|rrelu)",
         "a random op without a fixed seed: its generator state is read once at capture, so every replay "
         "draws the numbers of the capture (or the graph must register a graph-safe generator)", SILENT),
    Rule("foreign-inplace", None,
         "an in-place op writes into a tensor the piece does not own (an input buffer or a weight): the "
         "runner refills input buffers before each replay and other graphs read them", SILENT),
    Rule("closed-over-tensor", None,
         "a tensor that is neither an input buffer nor one of the model's weights entered the program as a "
         "parameter: it was closed over instead of passed in, so replays read the tensor captured at trace "
         "time (the stale-input bug)", DYNAMIC),
    Rule("baked-host-data", r"pd_op\.assign_value_?",
         "host data (a Python list or NumPy array) was copied into the program as a constant: replays keep "
         "the values of the capture even if the host data changes", SILENT),
    Rule("escaped-output", None,
         "a result leaves the piece other than through its static output buffers: an output that is an "
         "input buffer or a weight passed through, or a value computed and not returned (a reference kept "
         "in Python at trace time, which no replay updates)", PADDLE_GRAPHS),
    Rule("buffer-mismatch", None,
         "the program's feeds differ in count, shape or dtype from the static input buffers the runner "
         "copies into: a replay would read memory of another layout", PADDLE_GRAPHS),
    Rule("uncapturable-collective",
         r"pd_op\.(c_)?(all_?gather|all_?to_?all|alltoall|reduce_?scatter|c_reducescatter|broadcast|reduce|barrier"
         r"|p_send|p_recv|send_v2|recv_v2|partial_send|partial_recv|partial_allgather|c_concat|c_broadcast)_?",
         "a collective other than all_reduce: with gloo only all_reduce runs inside a static program, so the "
         "backend captures no other collective (NCCL would capture it, but identically on every rank)",
         NCCL_GRAPHS),
    Rule("capture-failed", None,
         "Paddle could not trace the piece into a fixed-shape program at this size: it would not capture",
         PADDLE_GRAPHS),
)

BY_NAME = {rule.name: rule for rule in RULES}
ALLOWED_COLLECTIVES = re.compile(r"pd_op\.(c_)?all_?reduce(_sum)?_?")  # what the backend captures


def op_rule(op_name: str) -> Rule | None:
    """The first op-name rule that `op_name` breaks, or None."""
    return next((rule for rule in RULES if rule.matches(op_name)), None)


def markdown_table() -> str:
    """The rules as the README's table (`python -m verifier.capture_rules`)."""
    rows = ["| rule | matches | why it breaks capture | source |", "|---|---|---|---|"]
    for rule in RULES:
        matches = "`{}`".format(rule.ops.replace("|", "\\|")) if rule.ops else "structural check"  # | splits cells
        rows.append(f"| `{rule.name}` | {matches} | {rule.why} | {rule.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
