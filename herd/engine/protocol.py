"""The executor wire format: what the scheduler sends the runners each step (small diffs against
the state they keep) and what they send back.

A sequence a runner has not seen arrives in full once (NewSeqData); afterwards only what changed
travels: the token sampled last step, blocks appended, local blocks released, and how many tokens to
compute now. Finished or preempted sequences are named so the runners drop them. The arrays are
compact numpy (a decode step of 256 sequences pickles to about 3 KB).

With async scheduling a step is built before the previous step's samples are known: its new token
is then PLACEHOLDER, meaning "the token you sampled last for this sequence", which the runner keeps
on the device."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from herd.engine.outputs import Logprob
from herd.multimodal.inputs import MultiModalSlice

# CachedSeqData.new_token_ids: no new token / a new token the runner sampled itself (async scheduling)
NO_TOKEN, PLACEHOLDER = -1, -2


@dataclass
class NewSeqData:
    seq_id: int
    token_ids: list[int]                  # every token known so far (prompt + outputs)
    num_prompt_tokens: int
    num_computed_tokens: int              # KV already in the cache (prefix-cache hits)
    block_tables: dict[str, list[int]]    # KV group -> block ids (-1 freed / never allocated)
    prompt_logprobs: bool


@dataclass
class CachedSeqData:
    """Sequences the runners already hold, aligned arrays."""
    seq_ids: np.ndarray                   # int32
    new_token_ids: np.ndarray             # int32: the token sampled last step, NO_TOKEN or PLACEHOLDER
    # per group: (index into seq_ids, block id) of blocks appended to those tables, in order
    new_blocks: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # per group: (index into seq_ids, number of leading -1 entries now) for local releases
    freed: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class SchedulerOutput:
    new_seqs: list[NewSeqData]
    cached: CachedSeqData
    order_ids: np.ndarray | None          # int32 seq ids in the batch's order; None: cached then new
    num_scheduled_tokens: np.ndarray      # aligned with order
    finished_seq_ids: list[int]           # drop these (finished, aborted or preempted)
    mm: dict[int, list[MultiModalSlice]] = field(default_factory=dict)  # image rows this step writes

    @property
    def order(self) -> np.ndarray:
        if self.order_ids is not None:
            return self.order_ids
        new = np.asarray([s.seq_id for s in self.new_seqs], dtype=np.int32)
        return np.concatenate([self.cached.seq_ids, new]) if len(new) else self.cached.seq_ids


@dataclass
class StepOutput:
    """Per scheduled sequence: the sampled token (None for an unfinished prefill chunk), its logprobs,
    and the prompt logprobs of the positions this step covered."""
    sampled: list[int | None]
    logprobs: list[dict[int, Logprob] | None]
    prompt_logprobs: list[list[dict[int, Logprob]] | None]
