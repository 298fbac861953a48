"""The engine's front door: load a checkpoint, run a set of prompts to completion, collect outputs.

`LLM.generate` drives scheduler and runner step by step and gathers, per request, everything the
gate compares: prompt logits, greedy tokens with the logits they came from, and the experts each
MoE layer routed every token to (prefill and decode separately).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.checkpoint.loader import load_weights
from engine.config import EngineConfig
from engine.distributed import init_parallel
from engine.errors import UserError
from engine.hf_config import read_model_config
from engine.models.moe_decoder import MoEDecoder
from engine.prefix_cache import PrefixCacheStats
from engine.routing_replay.replay import RoutingReplayer
from engine.routing_replay.session import RoutingSession, attach_routing
from engine.runner import ModelRunner, StepResult
from engine.scheduler import Batch, Request, Scheduler
from engine.threads import ProcessSetup, prepare_engine

log = logging.getLogger(__name__)


class PromptError(UserError, ValueError):
    """A prompt the model cannot run; the message names the prompt."""


@dataclass(frozen=True)
class Prompt:
    input_ids: tuple[int, ...]
    name: str = ""


@dataclass
class RequestOutput:
    """Everything one request produced. Arrays are copies that stay valid after the run."""

    name: str
    input_ids: np.ndarray  # [T] int64
    max_new_tokens: int
    prompt_logits: list[np.ndarray] = field(default_factory=list)  # chunks of [rows, V]
    greedy_logits: list[np.ndarray] = field(default_factory=list)  # [V] each
    greedy: list[int] = field(default_factory=list)
    prefill_routing: dict[int, list[np.ndarray]] = field(default_factory=dict)  # layer -> chunks of [rows, k]
    decode_routing: dict[int, list[np.ndarray]] = field(default_factory=dict)  # layer -> [1, k] per step

    def logits(self) -> np.ndarray:
        """Logits at every prompt position, [T, V] (only when prompt logits were recorded)."""
        return np.concatenate(self.prompt_logits)

    def topk_ids(self, layer: int, decode: bool = False) -> np.ndarray:
        chunks = (self.decode_routing if decode else self.prefill_routing).get(layer, [])
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.int64)


class LLM:
    """A decoder, its runner and a scheduler, built from a Hugging Face checkpoint directory."""

    def __init__(self, model_dir: str | Path, engine: EngineConfig | None = None,
                 routing_replay_dir: str | Path | None = None, replay_routing_dir: str | Path | None = None):
        """With `routing_replay_dir`, every finished request's routed experts are written there; with
        `replay_routing_dir`, every request routes by the experts recorded there (engine/routing_replay/).
        The first engine of a process applies the process set-up (engine/threads.py: kernel threads,
        MKL's GEMM path, heap policy), never over a value the user set; `setup` says what is in force."""
        self.engine = engine or EngineConfig()
        self.setup: ProcessSetup = prepare_engine(self.engine.parallel.tp)  # before the first GEMM of the process
        self.model_config = cfg = replace(read_model_config(model_dir), moe_form=self.engine.moe_form,
                                             dtype=self.engine.dtype)
        partition, comm = init_parallel(self.engine.parallel)
        weights = load_weights(model_dir, cfg, lambda name: partition.tensor_slice(cfg, name))
        self.model = MoEDecoder(cfg, weights, self.engine.faults, partition, comm,
                                self.engine.parallel.fused_allreduce_max_tokens)
        replay = RoutingReplayer(replay_routing_dir, cfg) if replay_routing_dir else None
        self.runner = ModelRunner(self.model, self.engine, replay)
        self.max_model_len = self.engine.max_len(self.model_config)
        self.routing: RoutingSession | None = attach_routing(self, routing_replay_dir) if routing_replay_dir else None
        self.prompt_tokens = 0  # prompt tokens of every workload run so far (the prefix cache's P)

    @property
    def prefix_stats(self) -> PrefixCacheStats:
        """The prefix cache's counters (all zero when prefix caching is off)."""
        return self.runner.prefix.stats if self.runner.prefix is not None else PrefixCacheStats()

    def prefix_summary(self) -> str:
        """`prefix cache: R of P prompt tokens reused` over every workload this engine ran (this
        rank's view; every rank makes the same hit decisions)."""
        state = "" if self.runner.prefix is not None else " (prefix caching off)"
        return f"prefix cache: {self.prefix_stats.reused_tokens} of {self.prompt_tokens} prompt tokens reused{state}"

    def generate(self, prompts: list[Prompt], max_new_tokens: int,
                 record_prompt_logits: bool = True) -> list[RequestOutput]:
        """Run all prompts as one workload (continuous batching) and return outputs in prompt order."""
        self._validate(prompts, max_new_tokens)
        if self.runner.replay is not None:  # R3: refuse a recording that does not fit before any step
            self.runner.replay.load(prompts, max_new_tokens)
        scheduler = Scheduler(self.engine.max_num_batched_tokens, self.engine.max_num_seqs,
                              self.runner.cache.allocator, self.engine.block_size, self.runner.prefix)
        outputs = {}
        self.prompt_tokens += sum(len(prompt.input_ids) for prompt in prompts)
        for i, prompt in enumerate(prompts):
            # A request that wants every prompt position's logits computes them all (as vLLM does
            # for prompt logprobs); it still leaves its blocks in the prefix cache for others.
            scheduler.add(Request(i, prompt.input_ids, max_new_tokens, prompt.name,
                                  reuse_prefix=not record_prompt_logits, forced_routing=self._forced(i)))
            outputs[i] = RequestOutput(prompt.name, np.asarray(prompt.input_ids, np.int64), max_new_tokens)
        try:
            self._run(scheduler, outputs, record_prompt_logits)
        except BaseException:
            if self.routing is not None:  # R3: unfinished requests leave no file; the run's own error wins
                with contextlib.suppress(Exception):
                    self.routing.close()
            raise
        if self.routing is not None:  # R3: wait for every file; a failed write is an error naming it
            self.routing.close()
        return [outputs[i] for i in range(len(prompts))]

    def _forced(self, request_id: int) -> np.ndarray | None:
        """The expert ids request `request_id` replays (its blocks are cached under them), or None."""
        return self.runner.replay.recorded_ids(request_id) if self.runner.replay is not None else None

    def _run(self, scheduler: Scheduler, outputs: dict[int, RequestOutput], record_prompt_logits: bool) -> None:
        steps = 0
        while scheduler.has_work:
            batch = scheduler.schedule()
            result = self.runner.step(batch, all_prompt_logits=record_prompt_logits)
            _collect(batch, result, outputs)
            finished = scheduler.update(batch, result.next_tokens, result.routed)
            if self.routing is not None:
                self.routing.finished(finished)
            steps += 1
            log.debug("step %d: %d tokens in %d segments", steps, batch.num_tokens, len(batch.segments))

    def _validate(self, prompts: list[Prompt], max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompts:
            raise PromptError("no prompts given")
        for i, prompt in enumerate(prompts):
            _validate_prompt(prompt, f"prompt {i}" + (f" ({prompt.name})" if prompt.name else ""),
                             self.model_config.vocab_size, self.max_model_len, max_new_tokens)


def _validate_prompt(prompt: Prompt, label: str, vocab: int, max_len: int, max_new: int) -> None:
    ids = prompt.input_ids
    if not ids:
        raise PromptError(f"{label} is empty")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise PromptError(f"{label}: token id {bad} is outside the vocabulary [0, {vocab})")
    # The last generated token is never fed back, so positions reach len + max_new - 2.
    if len(ids) + max_new - 1 > max_len:
        raise PromptError(f"{label}: {len(ids)} prompt tokens + {max_new} new tokens exceed the model's "
                          f"{max_len} positions")


def _collect(batch: Batch, result: StepResult, outputs: dict[int, RequestOutput]) -> None:
    for hit in batch.hits:  # cached tokens come first: the request's chunks are in token order
        target = outputs[hit.seq.request.request_id].prefill_routing
        for column, layer in enumerate(result.routing):
            target.setdefault(layer, []).append(np.sort(hit.rows[:, column], axis=-1))
    for i, seg in enumerate(batch.segments):
        out = outputs[seg.seq.request.request_id]
        logits = result.logits[i]
        if seg.is_prefill and len(logits) == seg.num_tokens:
            out.prompt_logits.append(logits)
        if seg.samples:
            out.greedy_logits.append(logits[-1])
            out.greedy.append(result.next_tokens[seg.seq.request.request_id])
        target = out.prefill_routing if seg.is_prefill else out.decode_routing
        for layer, rows in result.routing.items():
            target.setdefault(layer, []).append(rows[i])
