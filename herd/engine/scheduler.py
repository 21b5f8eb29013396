"""Token-budget continuous batching (vLLM V1 style).

Each step has a budget of `max_num_batched_tokens`. Running sequences go first (a decode costs one
token, an unfinished prefill continues with as many tokens as fit), then waiting sequences are
admitted with chunked prefills. When KV blocks run out, the most recently admitted running sequence
is preempted: its blocks are freed and it is recomputed later (prompt + tokens generated so far).
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


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]   # tokens to compute for each sequence this step
    output: SchedulerOutput | None = None   # the same step as diffs for the runners

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

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence):
        self.tracker.remove(seq.seq_id)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of `seq` to compute this step: what is left, within the budget, and never more
        than the KV pools could hold for it even if it were alone (a chunk needing more local
        blocks than the pool has would otherwise wait forever; a smaller one makes progress and
        frees the blocks its chunk window leaves behind). Should no token fit at all (pools below
        the engine's start-up check), the uncapped count is returned and allocation fails as before."""
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        return self.block_manager.max_chunk_tokens(seq, n) or n

    def schedule(self) -> ScheduledBatch:
        budget = self.budget
        seqs, counts = [], []
        preempted = False
        scheduled_running: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not self.block_manager.allocate_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled_running.append(seq)
                seqs.append(seq)
                counts.append(n)
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
            budget -= n
        return ScheduledBatch(seqs, counts, self.tracker.build(seqs, counts) if seqs else None)

    def finish(self, seq: Sequence, status: SequenceStatus):
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
