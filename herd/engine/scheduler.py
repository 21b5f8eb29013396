"""Token-budget continuous batching (vLLM V1 style).

Each step has a budget of `max_num_batched_tokens`. Running sequences go first (a decode costs one
token, an unfinished prefill continues with as many tokens as fit), then waiting sequences are
admitted with chunked prefills. When KV blocks run out, the most recently admitted running sequence
is preempted: its blocks are freed and it is recomputed later (prompt + tokens generated so far).

Async scheduling (vLLM's --async-scheduling): a step may be scheduled while earlier ones still run.
The scheduler counts per sequence what those steps compute and sample (`in_flight`); the sampled
tokens are placeholders in the next step (the runner feeds its own samples back on the device).
Stops are checked when the outputs arrive, so a sequence that stops there may have one more step
running, whose token is dropped. Such a step is scheduled only when nothing needs the unknown
tokens on the host: it is not scheduled (the engine waits and schedules synchronously) when a
sequence in flight has a grammar, penalties, bad words or logits processors, or when KV blocks run
out (preemption resets what the running steps advance).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from herd.config import SchedulerConfig
from herd.engine.block_manager import BlockManager
from herd.engine.protocol import SchedulerOutput
from herd.engine.scheduler_output import OutputTracker
from herd.engine.sequence import Sequence, SequenceStatus

_NOTHING = (0, 0)


def needs_host_tokens(seq: Sequence) -> bool:
    """The next sample of `seq` reads its output tokens' values on the host (async scheduling
    cannot run it before they are known)."""
    p = seq.params
    return (p.structured_output_request is not None or p.repetition_penalty != 1.0
            or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or bool(p.bad_words_token_ids)
            or bool(p.logits_processors))


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]   # tokens to compute for each sequence this step
    output: SchedulerOutput | None = None   # the same step as diffs for the runners
    samples: list[bool] | None = None       # the step samples a token for the sequence
    # output tokens before this step's sample, placeholders included (what min_tokens counts)
    num_output_tokens: list[int] | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.budget = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # vLLM's prefix_cache_queries / _hits: prompt tokens looked up in the prefix cache when a
        # sequence is admitted, and how many of them were found there
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.tracker = OutputTracker()
        # steps scheduled and not yet applied (update_from_output / discard), and per sequence
        # [tokens they compute, tokens they sample]
        self.num_steps_in_flight = 0
        self.in_flight: dict[Sequence, list[int]] = {}

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence):
        self.in_flight.pop(seq, None)
        self.tracker.remove(seq.seq_id)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _chunk(self, seq: Sequence, budget: int, ahead: int = 0, placeholders: int = 0) -> int:
        """Tokens of `seq` to compute this step: what is left, within the budget, and never more
        than the KV pools could hold for it even if it were alone (a chunk needing more local
        blocks than the pool has would otherwise wait forever; a smaller one makes progress and
        frees the blocks its chunk window leaves behind). Should no token fit at all (pools below
        the engine's start-up check), the uncapped count is returned and allocation fails as before.
        `ahead`/`placeholders`: what steps still running compute and sample for it (then 0 when
        nothing fits: the sequence waits for them)."""
        n = min(seq.num_tokens + placeholders - seq.num_computed_tokens - ahead, budget)
        if n <= 0:
            return 0
        cap = self.block_manager.max_chunk_tokens(seq, ahead + n) - ahead
        return cap if cap > 0 else (0 if ahead else n)

    def can_schedule_ahead(self) -> bool:
        """Whether a step may be scheduled now, before the running ones' tokens are known."""
        return not any(needs_host_tokens(seq) for seq, (_, sampling) in self.in_flight.items() if sampling)

    def schedule(self) -> ScheduledBatch:
        """The next step. With steps still running (async scheduling), an empty batch when this step
        cannot be scheduled before their outputs are known (see the module docstring)."""
        ahead = self.num_steps_in_flight > 0
        if ahead and not self.can_schedule_ahead():
            return ScheduledBatch([], [])
        budget = self.budget
        seqs, counts, starts, placeholders = [], [], [], []
        preempted = False
        scheduled_running: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            done, ph = self.in_flight.get(seq, _NOTHING)
            max_tokens = seq.params.max_tokens
            if ph and max_tokens is not None and len(seq.output_token_ids) + ph >= max_tokens:
                i += 1  # a running step samples its last token
                continue
            n = self._chunk(seq, budget, done, ph)
            if n == 0:
                i += 1
                continue
            while not self.block_manager.allocate_slots(seq, done + n):
                if ahead:  # preempting needs the running steps' outputs: schedule synchronously
                    return ScheduledBatch([], [])
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled_running.append(seq)
                seqs.append(seq)
                counts.append(n)
                starts.append(seq.num_computed_tokens + done)
                placeholders.append(ph)
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted
        # Admit waiting sequences only when nothing had to be preempted this step.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            lookup = seq.num_computed_tokens == 0
            cached = self.block_manager.get_computed_blocks(seq) if lookup else 0
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = self._chunk(seq, budget)
            if not self.chunked_prefill and n < remaining or not self.block_manager.allocate_slots(seq, n):
                # give back prefix-cache blocks taken for it, or waiting sequences could hoard them all
                self.block_manager.free(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.waiting.popleft()
            if lookup and self.block_manager.enable_prefix_caching and seq.params.prompt_logprobs is None:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += cached
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            starts.append(seq.num_computed_tokens)
            placeholders.append(0)
            budget -= n
        if not seqs:
            return ScheduledBatch([], [])
        batch = ScheduledBatch(seqs, counts, self.tracker.build(seqs, counts, starts, placeholders), [], [])
        for seq, n, start, ph in zip(seqs, counts, starts, placeholders):
            samples = start + n == seq.num_tokens + ph  # the step reaches the last known token
            batch.samples.append(samples)
            batch.num_output_tokens.append(len(seq.output_token_ids) + ph)
            rec = self.in_flight.setdefault(seq, [0, 0])
            rec[0] += n
            rec[1] += samples
        self.num_steps_in_flight += 1
        return batch

    def update_from_output(self, batch: ScheduledBatch):
        """`batch` ran and its outputs are being applied: it is no longer in flight."""
        if batch.samples is None:  # not made by schedule() (the engine's probe step)
            return
        self.num_steps_in_flight -= 1
        for seq, n, samples in zip(batch.seqs, batch.num_tokens, batch.samples):
            rec = self.in_flight.get(seq)
            if rec is None:  # finished or preempted meanwhile
                continue
            rec[0] -= n
            rec[1] -= samples
            if rec[0] == 0:
                del self.in_flight[seq]

    def discard(self, batch: ScheduledBatch):
        """`batch` failed, or one before it did (their requests are aborted next): forget it was in
        flight."""
        self.update_from_output(batch)

    def finish(self, seq: Sequence, status: SequenceStatus):
        self.in_flight.pop(seq, None)
        self.tracker.remove(seq.seq_id)
        seq.status = status
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
