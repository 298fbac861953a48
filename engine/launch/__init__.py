"""Starting an N-rank job; the one place in this project that starts rank processes.

  job.py         run_ranks(argv, nproc, ...) -> JobResult: one job to completion
  lifecycle.py   Launch: one started job (paddle.distributed.launch), its death watch and stop
  blame.py       which rank failed first; RankJobError with that rank's log tail
  processes.py   finding and signalling a job's processes by its token (/proc)
  rank_logs.py   a rank log's tail and the faulthandler stack dumped into it
  ports.py       the store's port, chosen below the ephemeral range
  rank_entry.py  the rank side: entry point, exit record, stack dumps, `serve` for a pool; the one
                 place that reads the launcher's environment variables
  wire.py        the pool folder's files: .npz requests and replies, atomic writes, polling
  watchdog.py    the rank side's bound on each collective: a stuck rank is named (step, call) and
                 ends with exit code 124; its state file tells the blame where each rank was
  cli_job.py     `python -m engine run --tp N`: the CLI re-run on N ranks, one report

The warm rank pool that the gate's cases use is verifier/rank_pool.py, built on these modules.
"""

from engine.launch.blame import RankJobError
from engine.launch.job import JobResult, run_ranks
from engine.launch.ports import free_port
from engine.launch.processes import job_pids
from engine.launch.rank_entry import serve

__all__ = ["JobResult", "RankJobError", "free_port", "job_pids", "run_ranks", "serve"]
