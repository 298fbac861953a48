"""Tensor and expert parallelism on `paddle.distributed`: who holds which slice, and the collectives.

World size W = tp. Each rank holds a `Partition` of the model:
  attention   query heads split W ways; KV heads split too, or, when there are fewer KV heads than
              ranks, each rank keeps the one KV head its query heads read (replicated)
  dense MLP   intermediate dimension split (gate/up by rows, down by columns)
  MoE, ep=1   every expert on every rank, each expert's intermediate dimension split
  MoE, ep=W   experts placed on ranks (E/W each, whole); every rank already holds every token
              (hidden states are replicated after each all-reduce), computes its own experts'
              share and the all-reduce combines the shares
  vocabulary  embedding and LM head rows split; lookups masked, logits gathered
Routers, norms and correction biases are replicated. A row-parallel bias is added by rank 0 only.

`Collectives` is the one interface the model talks to. Here it is all-reduce (the only collective
that gloo supports inside a static program) plus an eager all-gather for the LM head; an all-to-all
expert dispatch can replace the EP path behind it on NCCL. Every eager collective, and every call of
a captured program (the graph runner enters `watch` around it), runs under the rank's collective
watchdog (engine/launch/watchdog.py), which names the rank, the step and the call when one is stuck.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.distributed as dist

from engine.checkpoint.hub_schema import Role, role
from engine.config import ConfigError, ModelConfig, ParallelConfig
from engine.errors import UserError
from engine.launch import rank_entry
from engine.launch import watchdog as watchdogs


class ParallelError(UserError, RuntimeError):
    """Ranks that disagree, or a job whose world does not match its parallel config."""


@dataclass(frozen=True)
class Partition:
    """This rank's share of the model: plain index ranges, derived from (rank, world, ep)."""

    rank: int = 0
    world: int = 1
    expert_parallel: bool = False

    def split(self, n: int, what: str) -> range:
        if n % self.world:
            raise ConfigError(f"{what}={n} does not split evenly over {self.world} ranks")
        share = n // self.world
        return range(self.rank * share, (self.rank + 1) * share)

    def q_heads(self, cfg: ModelConfig) -> range:
        return self.split(cfg.num_heads, "num_attention_heads")

    def kv_heads(self, cfg: ModelConfig) -> range:
        if cfg.num_kv_heads >= self.world:
            return self.split(cfg.num_kv_heads, "num_key_value_heads")
        if self.world % cfg.num_kv_heads:
            raise ConfigError(f"num_key_value_heads={cfg.num_kv_heads} must divide the {self.world} ranks "
                              f"to be replicated across them")
        first = self.q_heads(cfg).start // (cfg.num_heads // cfg.num_kv_heads)
        return range(first, first + 1)

    def vocab(self, cfg: ModelConfig) -> range:
        return self.split(cfg.vocab_size, "vocab_size")

    def experts(self, cfg: ModelConfig) -> range:
        return self.split(cfg.num_experts, "the expert count") if self.expert_parallel else range(cfg.num_experts)

    def expert_intermediate(self, cfg: ModelConfig) -> range:
        if self.expert_parallel:
            return range(cfg.moe_intermediate_size)
        return self.split(cfg.moe_intermediate_size, "moe_intermediate_size")

    def tensor_slice(self, cfg: ModelConfig, name: str) -> tuple[slice, ...] | None:
        """How much of Hub tensor `name` this rank reads: a slice per axis, () for all of it, or
        None when the tensor belongs to other ranks only (an expert placed elsewhere)."""
        if self.world == 1:
            return ()
        found = role(name)
        if found is None:
            return ()  # norms, routers, correction biases: replicated
        return _RULES[found.kind](self, cfg, found)


def _rows(r: range, scale: int = 1) -> tuple[slice, ...]:
    return (slice(r.start * scale, r.stop * scale),)


def _cols(r: range, scale: int = 1) -> tuple[slice, ...]:
    return (slice(None), slice(r.start * scale, r.stop * scale))


def _expert(p: Partition, cfg: ModelConfig, tensor: Role) -> tuple[slice, ...] | None:
    if tensor.expert not in p.experts(cfg):
        return None
    inter = p.expert_intermediate(cfg)
    return _cols(inter) if tensor.proj == "down" else _rows(inter)


def _dense(p: Partition, cfg: ModelConfig, tensor: Role) -> tuple[slice, ...]:
    shared = tensor.kind == "shared_expert"
    size = cfg.moe_intermediate_size * cfg.n_shared_experts if shared else cfg.intermediate_size
    inter = p.split(size, "shared expert width" if shared else "intermediate_size")
    return _cols(inter) if tensor.proj == "down" else _rows(inter)


# Hub tensor role (engine/checkpoint/hub_schema.py) -> the slice of it this rank reads.
_RULES = {
    "vocab": lambda p, c, r: _rows(p.vocab(c)),
    "q_proj": lambda p, c, r: _rows(p.q_heads(c), c.head_dim),
    "kv_proj": lambda p, c, r: _rows(p.kv_heads(c), c.head_dim),
    "o_proj": lambda p, c, r: _cols(p.q_heads(c), c.head_dim),
    "expert": _expert,
    "shared_expert": _dense,
    "dense_mlp": _dense,
}


class Collectives:
    """The collectives the model uses. With one rank every call is the identity.

    `watchdog` (None: unbounded) bounds each eager call; `what` names its call site in the
    watchdog's message ("o_proj, layer 1"). While a program is being traced (static mode) a
    collective only becomes an op of the program, so it is not watched: the program's calls are."""

    def __init__(self, world: int = 1, group=None, watchdog: watchdogs.Watchdog | None = None):
        self.world = world
        self.group = group
        self.watchdog = watchdog

    def begin_step(self) -> None:
        """The calls from here on belong to the next step (what the watchdog's messages count)."""
        if self.watchdog is not None:
            self.watchdog.begin_step()

    def watch(self, kind: str, what: str = ""):
        """A context manager that bounds one call which communicates: a collective, or a call of
        a captured program holding collectives (kind "capture" or "replay", what "piece 3 at size 16")."""
        if self.watchdog is None or not paddle.in_dynamic_mode():
            return watchdogs.UNWATCHED
        return self.watchdog.watch(kind, what)

    def all_reduce(self, x: paddle.Tensor, what: str = "") -> paddle.Tensor:
        """Sum over ranks; safe inside a static program (gloo and NCCL)."""
        if self.world == 1:
            return x
        with self.watch("all_reduce", what):
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: paddle.Tensor, what: str = "") -> paddle.Tensor:
        """Concatenate every rank's x along the last axis, rank order. Eager only."""
        if self.world == 1:
            return x
        parts: list[paddle.Tensor] = []
        with self.watch("all_gather", what):
            dist.all_gather(parts, x, group=self.group)
        return paddle.concat(parts, axis=-1)

    def agree(self, values: list[int], what: str) -> None:
        """Raise ParallelError on every rank unless all ranks passed the same values (one all-reduce of
        [v, -v], reduced with MAX: equal everywhere iff max(v) == -max(-v))."""
        if self.world == 1:
            return
        both = paddle.to_tensor(values + [-v for v in values], dtype="int64")
        with self.watch("all_reduce", f"agreement on {what}"):
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        high, low = both.numpy()[: len(values)], -both.numpy()[len(values):]
        if (high != low).any():
            raise ParallelError(f"ranks disagree on {what}: this rank has {values}, the ranks span "
                                f"{low.tolist()}..{high.tolist()}")


def init_parallel(parallel: ParallelConfig) -> tuple[Partition, Collectives]:
    """Join the job (when there is more than one rank) and return this rank's partition and collectives."""
    if parallel.tp == 1:
        return Partition(), Collectives()
    world = dist.get_world_size()
    if world != parallel.tp:
        raise ParallelError(f"tp={parallel.tp} needs {parallel.tp} ranks, but this job has {world}; start it with "
                            f"`python -m paddle.distributed.launch --nproc_per_node {parallel.tp}`")
    if not dist.is_initialized():
        rank_entry.wait_for_store()  # skips Paddle's 3 s retry when rank 0's store is not up yet
        dist.init_parallel_env()
    rank_entry.record_joined()  # the parent's start-up bound waits for every rank's
    partition = Partition(dist.get_rank(), world, expert_parallel=parallel.ep > 1)
    timeout_s = parallel.collective_timeout_s
    watchdog = watchdogs.for_rank(partition.rank, timeout_s) if timeout_s else None
    return partition, Collectives(world, watchdog=watchdog)
