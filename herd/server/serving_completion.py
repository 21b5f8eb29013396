"""POST /v1/completions: one or several prompts (text or token ids), n samples each."""
from __future__ import annotations

import asyncio
import dataclasses
import re
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from herd.engine.sampling_params import SamplingParams
from herd.server.errors import OpenAIError
from herd.server.protocol import CompletionRequest
from herd.server.serving import (ChoiceCursor, OpenAIServing, Prepared, UsageTracker, finish_fields, now,
                                 openai_stream, prompt_logprobs_json, prompt_text_offsets, run_until_disconnect,
                                 sse)


# The end of a markdown image's URL: `)` or whitespace.
_URL_END = re.compile(r"[)\s]")


def find_md_images(text: str) -> list[tuple[int, int, str]]:
    """(start, end, url) of each markdown image `![alt](url)` in a completions prompt, as Llama 4
    deployments send them: alt without `]`, url non-empty without `)` or whitespace; leftmost,
    non-overlapping (what the regex r"!\\[[^\\]]*\\]\\(([^)\\s]+)\\)" finds). Linear time: the next
    `]` and the next URL end are found once and reused by every candidate start before them, where
    the regex backtracks over the rest of the text from each `![` (quadratic on `![](![](...`)."""
    found, pos, n = [], 0, len(text)
    close_at = end_at = -1  # the last "]" / URL end found; valid for every later start before it
    while True:
        i = text.find("![", pos)
        if i < 0:
            return found
        if close_at < i + 2:
            close_at = text.find("]", i + 2)
            if close_at < 0:  # no "]" from here on: no more images
                return found
        j = close_at
        if j + 1 < n and text[j + 1] == "(":
            u = j + 2
            if end_at < u:
                m = _URL_END.search(text, u)
                end_at = m.start() if m else n
            k = end_at
            if u < k < n and text[k] == ")":
                found.append((i, k + 1, text[u:k]))
                pos = k + 1
                continue
        pos = i + 1


def replace_md_images(text: str, spans: list[tuple[int, int, str]], placeholder: str) -> str:
    parts, last = [], 0
    for start, end, _ in spans:
        parts += [text[last:start], placeholder]
        last = end
    parts.append(text[last:])
    return "".join(parts)


class OpenAIServingCompletion(OpenAIServing):
    def _prepare_image_prompt(self, prompt: str, spans, request: CompletionRequest) -> Prepared:
        """Each ![](url) becomes <|image|> plus its image (fetch, decode, tile)."""
        images = [self.settings.media.load_image(url) for _, _, url in spans]
        ids = self.tokenizer.encode(replace_md_images(prompt, spans, "<|image|>"),
                                    add_special_tokens=request.add_special_tokens)
        _, ids, mm = self.llm.process_prompt({"prompt_token_ids": ids, "multi_modal_data": {"image": images}},
                                             SamplingParams())
        prep = self.prepare(ids, request, prompt)
        prep.mm = mm
        return self._with_echo_offsets(prep, request, skip_special_tokens=True)

    def _with_echo_offsets(self, prep: Prepared, request: CompletionRequest, skip_special_tokens: bool) -> Prepared:
        if request.echo and request.logprobs is not None and prep.text is not None:
            prep.echo_offsets = prompt_text_offsets(self.tokenizer, prep.token_ids, prep.text, skip_special_tokens)
        return prep

    def _prepare_all(self, request: CompletionRequest) -> list[Prepared]:
        """Tokenize and check every prompt; runs in a worker thread, never on the event loop."""
        preps = []
        for prompt in request.prompts():
            if isinstance(prompt, str):
                spans = find_md_images(prompt)
                # on a text model, else the image's URL (base64 and all) would be read as text
                self.check_image_count(len(spans), "The prompt contains a markdown image `![](...)`", "prompt")
                # (image URLs, data URLs included, do not count: they are not tokenized)
                self.check_prompt_chars(replace_md_images(prompt, spans, "<|image|>") if spans else prompt)
                if spans:
                    preps.append(self._prepare_image_prompt(prompt, spans, request))
                    continue
                ids = self.tokenizer.encode(prompt, add_special_tokens=request.add_special_tokens)
                text = prompt
            else:
                ids = list(prompt)
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise OpenAIError(f"Token id {bad[0]} is out of vocabulary (vocab size {self.vocab_size})",
                                      param="prompt")
                if len(ids) >= self.max_model_len:  # refused by prepare() below; do not decode it
                    text = None
                else:
                    text = self.tokenizer.decode(ids, skip_special_tokens=False) if request.echo else None
            # (an echoed text prompt is the caller's string, without the special tokens added to it)
            preps.append(self._with_echo_offsets(self.prepare(ids, request, text), request,
                                                 skip_special_tokens=isinstance(prompt, str)))
        return preps

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model = self.model_name(request.model)
        if request.suffix is not None:  # vLLM's message, which fill-in-the-middle clients look for
            raise OpenAIError("suffix is not currently supported", param="suffix")
        preps = await asyncio.to_thread(self._prepare_all, request)
        request_id = self.new_request_id("cmpl", request)
        if request.stream:
            return self.sse(openai_stream(self._stream(request, preps, request_id, model)))
        finals = await run_until_disconnect(raw_request, self.collect(preps, request_id))
        if finals is None:  # the client went away
            return Response(status_code=499)
        return JSONResponse(self._response(request, preps, finals, request_id, model))

    def _echo_prefix(self, request: CompletionRequest, prep: Prepared, out) -> tuple[str, dict | None]:
        """Prompt text and (with logprobs) prompt-token logprobs shown before the completion."""
        if not request.echo:
            return "", None
        text = prep.text or ""
        if request.logprobs is None:
            return text, None
        lps = self.completion_logprobs(out.prompt_token_ids, out.prompt_logprobs or [], 0,
                                       request.return_tokens_as_token_ids)
        # offsets into the echoed text (an added BOS takes no room), so the completion's continue them
        lps["text_offset"] = prep.echo_offsets or [min(x, len(text)) for x in lps["text_offset"]]
        return text, lps

    @staticmethod
    def _scored_only(out):
        """echo with max_tokens 0: the one token sampled after the prompt is not part of the answer."""
        return dataclasses.replace(out, outputs=[
            dataclasses.replace(o, text="", token_ids=[], logprobs=None if o.logprobs is None else [])
            for o in out.outputs])

    def _response(self, request, preps, finals, request_id, model) -> dict:
        choices, usage = [], UsageTracker()
        for i, (prep, out) in enumerate(zip(preps, finals)):
            if request.echo_only:
                out = self._scored_only(out)
            usage.update(i, out)
            first = len(choices)
            prefix, prefix_lps = self._echo_prefix(request, prep, out)
            for o in out.outputs:
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self.completion_logprobs(o.token_ids, o.logprobs or [], len(prefix),
                                                        request.return_tokens_as_token_ids)
                    if prefix_lps is not None:
                        logprobs = {k: prefix_lps[k] + logprobs[k] for k in logprobs}
                choices.append({"index": i * request.n + o.index, "text": prefix + o.text,
                                "logprobs": logprobs, **finish_fields(o), "prompt_logprobs": None})
            if request.prompt_logprobs is not None and len(choices) > first:
                # Once per prompt, on its first sample: the n samples share the prompt, and
                # repeating them made small requests return huge responses.
                choices[first]["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
        return {"id": request_id, "object": "text_completion", "created": now(), "model": model,
                "choices": choices, "usage": usage.as_dict(), "system_fingerprint": None}

    async def _stream(self, request: CompletionRequest, preps, request_id, model):
        created = now()
        cursors = {}
        usage = UsageTracker()

        def chunk(choices, with_usage=False):
            body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": choices}
            if with_usage:
                body["usage"] = usage.as_dict()
            return sse(body)

        async with aclosing(self.merged(preps, request_id)) as stream:
            async for i, out in stream:
                prep = preps[i]
                if request.echo_only:
                    out = self._scored_only(out)
                usage.update(i, out)
                for o in out.outputs:
                    cur = cursors.setdefault((i, o.index), ChoiceCursor())
                    if cur.finished:  # n > 1: this sample ended in an earlier output
                        continue
                    sent_before = cur.text_sent
                    delta, t0, t1 = cur.advance(o, prep.params)
                    prefix, prefix_lps = ("", None)
                    if not cur.started:
                        prefix, prefix_lps = self._echo_prefix(request, prep, out)
                        cur.echo_len = len(prefix)
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = self.completion_logprobs(o.token_ids[t0:t1], (o.logprobs or [])[t0:t1],
                                                            cur.echo_len + sent_before,
                                                            request.return_tokens_as_token_ids)
                        if prefix_lps is not None:
                            logprobs = {k: prefix_lps[k] + logprobs[k] for k in logprobs}
                    has_tokens = logprobs is not None and t1 > t0
                    if not (prefix or delta or has_tokens or cur.finished):
                        continue
                    cur.started = True
                    yield chunk([{"index": i * request.n + o.index, "text": prefix + delta,
                                  "logprobs": logprobs, **finish_fields(o)}],
                                with_usage=request.continuous_usage)
        if request.include_usage:
            yield chunk([], with_usage=True)

