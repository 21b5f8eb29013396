"""Request and sequence state. A request with n > 1 fans out into n sequences sharing the prompt."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from herd.engine.outputs import Logprob, PromptLogprobs, RequestMetrics
from herd.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from herd.multimodal.inputs import MultiModalInputs


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                        SequenceStatus.FINISHED_ABORTED)


FINISH_REASON = {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length",
                 SequenceStatus.FINISHED_ABORTED: "abort"}


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int                            # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.time)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0          # tokens whose KV is in the cache
    num_cached_tokens: int = 0            # of those, how many came from the prefix cache
    block_tables: dict[str, list[int]] = field(default_factory=dict)   # group -> block ids (-1 freed)
    block_hashes: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    # outputs
    output_text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    prompt_logprobs: PromptLogprobs | None = None
    stop_reason: int | str | None = None
    detokenizer: object | None = None
    metrics: RequestMetrics | None = None
    multi_modal: MultiModalInputs | None = None   # images of the prompt (shared by a request's seqs)

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASON.get(self.status)

    def block_extra_keys(self, start: int, end: int) -> tuple:
        """Prefix-cache keys besides the tokens of positions [start, end): the image hashes."""
        return self.multi_modal.extra_keys(start, end) if self.multi_modal is not None else ()

    def token_at(self, pos: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < p else self.output_token_ids[pos - p]
