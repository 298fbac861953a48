"""Which rank writes routing files, as wired in the real engine (a 2-rank CLI job, observed from
outside the engine).

The bug class: under tensor parallelism every rank records the same routing, and exactly one rank
(rank 0) must write each request's file. A wiring in which a non-zero TP rank's engine creates,
writes or renames anything in the routing folder (every rank a writer, rank 1 as well as rank 0,
rank 1 instead of rank 0), or in which rank 0 does not write each file itself, is in the class,
whatever the edit (the session's writer flag, the store's role, the failpoint
`r3.every_rank_writes`). The store's own cases set the writer role by hand and the 4-rank CLI case
only looks at the final files, which every rank writes identically: neither sees the class.

Observed by cases/write_watch.py: a CPython audit hook loaded into every process of the job
before any project code, logging each write-like file operation in the routing folder with the
writing process's rank. The check trusts neither the engine's file list nor its logs.
"""

from __future__ import annotations

import pytest
from write_watch import observed

pytestmark = [pytest.mark.xdist_group("two_rank_cli"), pytest.mark.gate_area("routing replay")]


def test_rank_zero_alone_writes_each_routing_file(two_rank_routing_job):
    job = two_rank_routing_job
    assert job.done.returncode == 0, job.done.stderr[-3000:]
    started, writes = observed(job.watch_logs)
    assert {"0", "1"} <= started, f"the observer did not run in both ranks: {sorted(started)}"
    strangers = sorted({(w.rank, w.event, w.path.name) for w in writes if w.rank != "0"})
    assert strangers == [], f"processes other than rank 0 wrote into {job.routing}: {strangers}"
    final = sorted(p.name for p in job.routing.iterdir()) if job.routing.exists() else []
    assert final == ["first.safetensors", "second.safetensors"], final
    renamed_by_zero = sorted(w.path.name for w in writes if w.event == "os.rename")
    assert renamed_by_zero == final, f"rank 0 did not put each file in place itself: {renamed_by_zero}"
