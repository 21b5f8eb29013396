"""Request outputs, shaped like vLLM's so that vLLM users find the same attributes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """Log probability of one token. `rank` is 1 for the most likely token."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated position: token id -> Logprob (the sampled token plus the top-N).
SampleLogprobs = list[dict[int, Logprob]]
# Like SampleLogprobs for the prompt; the first position has no logprob (None).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of a request's life; None until reached."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0

    def snapshot(self) -> "RequestMetrics":
        """A copy (made for every request every step: ~1 us, where dataclasses.replace and
        copy.copy take 6-7)."""
        new = object.__new__(RequestMetrics)
        new.__dict__.update(self.__dict__)
        return new


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request."""
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None      # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None


@dataclass
class BeamSearchSequence:
    """One hypothesis of LLM.beam_search. `tokens` include the prompt's; `logprobs` has one dict per
    generated token; `text` (the whole sequence, decoded) is filled when it is returned."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None      # "stop" (an EOS token) | "length"
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The best `beam_width` sequences of one prompt, best first."""
    sequences: list[BeamSearchSequence]
