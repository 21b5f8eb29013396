"""OutputProcessor: what the engine core reports (new token ids per sequence) -> the RequestOutputs
callers see, with text.

The engine core works in tokens: it stops sequences on EOS, stop token ids, a completed grammar
and length. Here each sequence is detokenized incrementally, stop strings are found, logprob tokens
decoded and the cumulative RequestOutput built. The in-process engine (LLMEngine.step) and an API
server in front of engine core processes run this same code, so both give the same text.

A stop string ends a sequence here first; the caller then tells the core to finish it (the
in-process engine at once; a core in another process by message, by when it may have run one more
step for that sequence, whose token is dropped here).
"""
from __future__ import annotations

from dataclasses import dataclass

from herd.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from herd.engine.sampling_params import SamplingParams
from herd.engine.tokenizer import IncrementalDetokenizer, decode_logprob_tokens


@dataclass
class SeqOutput:
    """One sequence's news from one engine step."""
    index: int                                   # which of the request's n completions
    new_token_ids: list[int]
    new_logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None             # set when the core finished the sequence
    stop_reason: int | str | None = None
    stop_terminated: bool = False                # the last token is EOS / a stop id: its text is left out


@dataclass
class EngineCoreOutput:
    """One request's news from one engine step (only the sequences that changed)."""
    request_id: str
    seqs: list[SeqOutput]
    new_prompt_logprobs: list | None = None      # prompt positions this step covered (first sequence)
    metrics: RequestMetrics | None = None        # the first sequence's timestamps, a copy
    num_cached_tokens: int = 0
    finished: bool = False                       # every sequence finished in the core


class _SeqState:
    __slots__ = ("detokenizer", "token_ids", "logprobs", "cumulative_logprob", "finish_reason", "stop_reason")

    def __init__(self, detokenizer: IncrementalDetokenizer | None, want_logprobs: bool):
        self.detokenizer = detokenizer            # None: detokenize=False (token ids only)
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if want_logprobs else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_SeqState]
    prompt_logprobs: list | None
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    decode: bool = True                          # detokenize: text and logprob token strings

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> None:
        """`params` as the engine core got them (before its per-request updates): the n
        completions share the stop strings and detokenizer options."""
        text = getattr(params, "detokenize", True)
        seqs = [_SeqState(IncrementalDetokenizer.from_params(self.tokenizer, prompt_token_ids, params) if text
                          else None, params.logprobs is not None) for _ in range(params.n)]
        self.requests[request_id] = _RequestState(
            request_id, prompt, list(prompt_token_ids), seqs,
            [None] if params.prompt_logprobs is not None else None, RequestMetrics(arrival_time=arrival_time),
            decode=text)

    def abort_request(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def process_outputs(self, outputs: list[EngineCoreOutput]
                        ) -> tuple[list[RequestOutput], list[tuple[str, int, str]]]:
        """RequestOutputs for the requests these outputs touched, and the sequences a stop string
        ended here while the core still runs them: (request id, sequence index, stop string).
        Finished requests are forgotten; outputs for unknown requests are dropped."""
        results, stops = [], []
        tok = self.tokenizer
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:  # ended here already (a stop string) or aborted
                continue
            if out.new_prompt_logprobs and state.prompt_logprobs is not None:
                if state.decode:
                    decode_logprob_tokens(tok, out.new_prompt_logprobs)
                state.prompt_logprobs.extend(out.new_prompt_logprobs)
            for so in out.seqs:
                s = state.seqs[so.index]
                if s.finish_reason is not None:  # a stop string ended it; the core ran ahead
                    continue
                s.token_ids.extend(so.new_token_ids)
                if so.new_logprobs is not None and s.logprobs is not None:
                    if state.decode:
                        decode_logprob_tokens(tok, so.new_logprobs)
                    s.logprobs.extend(so.new_logprobs)
                if so.cumulative_logprob is not None:
                    s.cumulative_logprob = so.cumulative_logprob
                done = so.finish_reason is not None
                stop_str = None if s.detokenizer is None else s.detokenizer.update(
                    so.new_token_ids, stop_terminated=so.stop_terminated, finished=done)
                if stop_str is not None:
                    s.finish_reason, s.stop_reason = "stop", stop_str
                    if not done:
                        stops.append((out.request_id, so.index, stop_str))
                elif done:
                    s.finish_reason, s.stop_reason = so.finish_reason, so.stop_reason
            if out.metrics is not None:
                state.metrics = out.metrics
            state.num_cached_tokens = out.num_cached_tokens
            finished = state.finished
            if finished and state.metrics.finished_time is None:  # ended here by a stop string
                state.metrics.finished_time = state.metrics.last_token_time
            results.append(self._make_output(state, finished))
            if finished:
                del self.requests[out.request_id]
        return results, stops

    @staticmethod
    def _make_output(state: _RequestState, finished: bool) -> RequestOutput:
        outs = [CompletionOutput(index=i, text=s.detokenizer.output_text if s.detokenizer is not None else "",
                                 token_ids=list(s.token_ids),
                                 cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                                 logprobs=s.logprobs, finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                for i, s in enumerate(state.seqs)]
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, prompt_logprobs=state.prompt_logprobs,
                             outputs=outs, finished=finished, metrics=state.metrics,
                             num_cached_tokens=state.num_cached_tokens)
