"""RoutingSession: routing replay recording for one engine, the glue between runner and store.

The runner drives `recorder` after every step; the engine calls `finished` with the sequences a
step retired and `close` when a workload ends (normally or not). Only finished requests are
saved: a request that never finished (the workload failed or was cancelled) leaves no file.
Each request is saved under its name, or `request-<id>` when it has none.
"""

from __future__ import annotations

from pathlib import Path

from engine.failpoints import NO_FAULTS, Failpoints
from engine.graph.capture_sizes import capture_sizes_for
from engine.routing_replay import model_identity
from engine.routing_replay.recorder import RoutingRecorder
from engine.routing_replay.store import RoutingStore
from engine.routing_replay.table_file import RoutingTable, prompt_digest


class RoutingSession:
    def __init__(self, directory: str | Path, model_config, max_rows: int, writes: bool = True,
                 agree=None, faults: Failpoints = NO_FAULTS, background: bool = True, rank: int = 0):
        """`max_rows`: the most rows a step returns (token budget or largest capture size);
        `writes`: whether this rank writes files (rank 0 of a job); `agree`: the ranks' check."""
        cfg = model_config
        self.directory, self.model, self.cfg = Path(directory), model_identity(cfg), cfg
        self.recorder = RoutingRecorder(cfg.moe_layers, cfg.top_k, cfg.num_experts, max_rows, agree, faults, rank)
        self._store_args = dict(writes=writes, background=background, faults=faults)
        self._store: RoutingStore | None = None
        self.files: list[Path] = []  # every file this session wrote (or, on a non-writing rank, would have)

    def finished(self, sequences) -> None:
        """Save the tables of sequences a step just retired (`Scheduler.update`'s return)."""
        if self._store is None:
            self._store = RoutingStore(self.directory, **self._store_args)
        for seq in sequences:
            request = seq.request
            ids = self.recorder.finish(request.request_id, seq.num_computed)
            table = RoutingTable(request.name or f"request-{request.request_id}", self.model, self.cfg.moe_layers,
                                 self.cfg.top_k, self.cfg.num_experts, seq.prompt_len,
                                 prompt_digest(request.prompt), ids)
            self.files.append(self._store.save(table))

    def close(self) -> None:
        """End of a workload: forget unfinished requests, wait for pending writes (raising the
        first failure). The next workload starts a new store, so names may repeat across workloads."""
        self.recorder.drop_all()
        store, self._store = self._store, None
        if store is not None:
            store.close()


def attach_routing(llm, directory: str | Path, faults: Failpoints | None = None) -> RoutingSession:
    """A session recording `llm`'s routing into `directory`, wired into its runner (replacing any
    previous one). Rank 0 writes; every rank checks that all ranks recorded the same ids."""
    engine, part, comm = llm.engine, llm.model.partition, llm.model.comm
    sizes = [s for cs in capture_sizes_for(engine).values() for s in cs.sizes]
    max_rows = max([engine.max_num_batched_tokens, engine.max_num_seqs, *sizes])
    session = RoutingSession(directory, llm.model_config, max_rows, writes=part.rank == 0,
                             agree=comm.agree if part.world > 1 else None,
                             faults=engine.faults if faults is None else faults, rank=part.rank)
    llm.runner.recorder = session.recorder
    llm.routing = session
    return session
