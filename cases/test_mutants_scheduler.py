"""Cases that kill mutants of engine/scheduler.py the engine-level cases let live (bench/mutation.md).

The engine's batching cases only see outputs, and outputs do not depend on how steps are cut, so
off-by-one edits of the token budget or of the sequence limit went unseen. Here the scheduler is
driven directly and each step's segments are compared with traces worked out by hand from the
policy in its docstring: decodes first (one token each, oldest first), then prompt chunks with
what is left of `max_num_batched_tokens`, at most `max_num_seqs` sequences running.
"""

from __future__ import annotations

from engine.kv_cache import BlockAllocator
from engine.scheduler import Request, Scheduler


def _segments(batch):
    """(request id, start, num_tokens, samples) per segment: what a step holds."""
    return [(s.seq.request.request_id, s.start, s.num_tokens, s.samples) for s in batch.segments]


def _scheduler(budget: int, max_seqs: int, prompts: list[int], new_tokens: int) -> Scheduler:
    sched = Scheduler(budget, max_seqs, BlockAllocator(8), block_size=4)
    for rid, length in enumerate(prompts):
        sched.add(Request(rid, tuple(range(1, length + 1)), new_tokens))
    return sched


def _step(sched: Scheduler) -> list[tuple]:
    """Schedule one step, then record it with token 50 + request id for every sampling segment."""
    batch = sched.schedule()
    sched.update(batch, {s.seq.request.request_id: 50 + s.seq.request.request_id
                         for s in batch.segments if s.samples})
    return _segments(batch)


def test_the_whole_budget_is_spent_and_never_exceeded():
    """Budget 2, three one-token prompts, two tokens each: two prefills fill step 1, two decodes
    fill step 2 while the third prompt waits; it runs once the first two have finished."""
    sched = _scheduler(budget=2, max_seqs=3, prompts=[1, 1, 1], new_tokens=2)
    trace = [_step(sched) for _ in range(4)]
    assert trace == [
        [(0, 0, 1, True), (1, 0, 1, True)],
        [(0, 1, 1, True), (1, 1, 1, True)],
        [(2, 0, 1, True)],
        [(2, 1, 1, True)],
    ]
    assert not sched.has_work


def test_one_running_sequence_chunks_its_prompt_and_the_next_waits():
    """max_num_seqs 1, budget 3: a 5-token prompt runs as chunks 3 + 2 (only the last samples);
    the second request is admitted only after the first finished and gave its blocks back."""
    sched = _scheduler(budget=3, max_seqs=1, prompts=[5, 2], new_tokens=1)
    first = sched.schedule()
    assert _segments(first) == [(0, 0, 3, False)]
    assert first.slot_mapping(4) == [0, 1, 2]  # block 0 (lowest id first)
    sched.update(first, {})
    second = sched.schedule()
    assert _segments(second) == [(0, 3, 2, True)]
    assert second.slot_mapping(4) == [3, 4]  # position 3 in block 0, position 4 in block 1
    seq = second.segments[0].seq
    assert sched.update(second, {0: 9}) == [seq]
    assert seq.tokens == [1, 2, 3, 4, 5, 9]
    assert seq.block_table == [] and sched.allocator.num_free == 8
    third = sched.schedule()
    assert _segments(third) == [(1, 0, 2, True)]
    assert third.slot_mapping(4) == [0, 1]
