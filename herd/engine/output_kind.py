"""SamplingParams.output_kind for streamed outputs: the engine's outputs are cumulative; a caller
that asked for DELTA gets only what is new since its last output, one that asked for FINAL_ONLY
only the finished output."""
from __future__ import annotations

import dataclasses

from herd.engine.outputs import RequestOutput
from herd.engine.sampling_params import RequestOutputKind, SamplingParams
from herd.engine.tokenizer import partial_stop_length


class OutputKindFilter:
    """Call with each cumulative RequestOutput of one request; returns what to hand on, or None."""

    def __init__(self, params: SamplingParams | None):
        self.params = params
        self.kind = params.output_kind if params is not None else RequestOutputKind.CUMULATIVE
        self.sent: dict[int, tuple[int, int]] = {}   # completion index -> (tokens, characters) sent
        self.done: set[int] = set()
        self.first = True

    def __call__(self, out: RequestOutput) -> RequestOutput | None:
        if self.kind == RequestOutputKind.CUMULATIVE:
            return out
        if self.kind == RequestOutputKind.FINAL_ONLY:
            return out if out.finished else None
        p = self.params
        deltas = []
        for o in out.outputs:
            if o.index in self.done:
                continue
            tokens, chars = self.sent.get(o.index, (0, 0))
            end = len(o.text)
            if o.finish_reason is None and p.stop and not p.include_stop_str_in_output:
                end -= partial_stop_length(o.text, p.stop)  # it may still become a stop string, cut later
            end = max(end, chars)
            if o.finish_reason is None and len(o.token_ids) == tokens and end == chars:
                continue
            deltas.append(dataclasses.replace(
                o, text=o.text[chars:end], token_ids=o.token_ids[tokens:],
                logprobs=o.logprobs[tokens:] if o.logprobs is not None else None))
            self.sent[o.index] = (len(o.token_ids), end)
            if o.finish_reason is not None:
                self.done.add(o.index)
        if not deltas and not out.finished:
            return None
        prompt_logprobs = out.prompt_logprobs if self.first else None  # once, with the first delta
        self.first = False
        return dataclasses.replace(out, outputs=deltas, prompt_logprobs=prompt_logprobs)
