"""What the completion and chat handlers share: model names, prompt checks, max_tokens, the engine
stream with metrics, merging of several prompts' streams, SSE and logprob formatting."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from herd.engine.outputs import CompletionOutput, Logprob, RequestOutput
from herd.engine.sampling_params import SamplingParams, SamplingParamsError
from herd.engine.tokenizer import IncrementalDetokenizer, partial_stop_length
from herd.server.errors import OpenAIError, error_body, to_openai_error
from herd.server.metrics import ServerMetrics
from herd.server.protocol import GENERATION_DEFAULTS

logger = logging.getLogger(__name__)

# JSON has no -inf; vLLM reports impossible tokens with this floor.
_MIN_LOGPROB = -9999.0
# A text prompt longer than this many characters per token of max_model_len is refused before it
# is tokenized (no tokenizer makes tokens that long on average; the limit bounds tokenizer time).
MAX_PROMPT_CHARS_PER_TOKEN = 64
# Default of --stream-write-timeout: a streaming client that takes no data for this long is dropped.
DEFAULT_STREAM_WRITE_TIMEOUT = 60.0


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_path: str
    max_logprobs: int = 20
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    response_role: str = "assistant"
    log_requests: bool = False
    api_key: str | list[str] | None = None     # any of these keys is accepted
    return_tokens_as_token_ids: bool = False    # --return-tokens-as-token-ids: for every request
    media: object | None = None          # herd.multimodal.media.MediaConnector for image_url parts
    stream_write_timeout: float | None = DEFAULT_STREAM_WRITE_TIMEOUT  # None/0: wait forever
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # herd.server.tool_parsers name (--tool-call-parser)
    ignored_fields: set[str] = field(default_factory=set)  # request fields already logged as ignored


@dataclass
class Prepared:
    """One prompt, tokenized and checked, ready for the engine."""
    token_ids: list[int]
    params: SamplingParams
    text: str | None = None
    mm: object | None = None             # preprocessed images (LLMEngine.process_prompt)
    echo_offsets: list[int] | None = None  # where each prompt token starts in `text` (echo + logprobs)


@dataclass
class ChoiceCursor:
    """How much of one cumulative CompletionOutput has been streamed."""
    text_sent: int = 0
    tokens_sent: int = 0
    started: bool = False
    finished: bool = False
    echo_len: int = 0

    def advance(self, out: CompletionOutput, params: SamplingParams) -> tuple[str, int, int]:
        """New text and the range of new token positions. While running, a tail that may still
        grow into a stop string is held back (the engine cuts the stop string at the end)."""
        end = len(out.text)
        if out.finish_reason is None and params.stop and not params.include_stop_str_in_output:
            end -= partial_stop_length(out.text, params.stop)
        end = max(end, self.text_sent)
        delta = out.text[self.text_sent:end]
        start = self.tokens_sent
        self.text_sent, self.tokens_sent = end, len(out.token_ids)
        self.finished = out.finish_reason is not None
        return delta, start, self.tokens_sent


@dataclass
class UsageTracker:
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[tuple[int, int], int] = field(default_factory=dict)

    def update(self, prompt_index: int, out: RequestOutput):
        self.prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        for o in out.outputs:
            self.completion_tokens[(prompt_index, o.index)] = len(o.token_ids)

    def as_dict(self) -> dict:
        p, c = sum(self.prompt_tokens.values()), sum(self.completion_tokens.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": None}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def openai_stream(body: AsyncIterator[str]) -> AsyncIterator[str]:
    """The shared tail of chat and completion streams: the body's chunks, then `[DONE]`; a failure
    after the 200 went out is reported in the stream as an OpenAI error event before `[DONE]`."""
    try:
        async with aclosing(body) as chunks:
            async for chunk in chunks:
                yield chunk
    except Exception as e:
        err = to_openai_error(e)
        yield sse(error_body(err.message, err.status, err.type, err.param))
    yield SSE_DONE


class SlowConsumerError(Exception):
    pass


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is always closed: a client that goes away aborts its
    requests right away (their KV blocks are freed), not when the generator is collected.

    With `write_timeout`, a client that takes no data for that long (its socket buffers are full:
    it stopped reading) is dropped the same way, so it cannot hold a request and its KV blocks."""

    media_type = "text/event-stream"

    def __init__(self, content, write_timeout: float | None = None, **kw):
        super().__init__(content, **kw)
        self.write_timeout = write_timeout or None

    async def __call__(self, scope, receive, send):
        timeout = self.write_timeout
        if timeout:
            inner = send

            async def send(message):
                try:
                    async with asyncio.timeout(timeout):
                        await inner(message)
                except TimeoutError:
                    raise SlowConsumerError(f"the client read nothing for {timeout:g} s") from None
        try:
            await super().__call__(scope, receive, send)
        except BaseException as e:
            slow = [e] if isinstance(e, SlowConsumerError) else (
                e.subgroup(SlowConsumerError).exceptions if isinstance(e, BaseExceptionGroup)
                and e.subgroup(SlowConsumerError) else [])
            if not slow:
                raise
            logger.warning("dropping a streaming client: %s (--stream-write-timeout)", slow[0])
        finally:
            await self.body_iterator.aclose()


async def run_until_disconnect(raw_request: Request, coro):
    """Await a non-streaming handler, cancelling it (and its engine requests) if the client
    disconnects first. Returns None in that case."""
    async def disconnected():
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(coro), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    return work.result() if not work.cancelled() else None


class OpenAIServing:
    def __init__(self, engine, settings: ServerSettings, metrics: ServerMetrics):
        self.engine = engine
        self.llm = engine.engine
        self.tokenizer = engine.tokenizer
        self.settings = settings
        self.metrics = metrics
        self.max_model_len = self.llm.max_model_len
        self.vocab_size = self.llm.vocab_size
        defaults = self.llm.default_sampling_params()
        self.sampling_defaults = {k: getattr(defaults, k) for k in GENERATION_DEFAULTS}
        self.default_max_new_tokens = self.llm.generation_config.get("max_new_tokens")

    # -- checks -----------------------------------------------------------------------------
    def model_name(self, requested: str | None) -> str:
        names = self.settings.served_model_names
        if requested is None or requested == "":
            return names[0]
        if requested not in names:
            raise OpenAIError(f"The model `{requested}` does not exist.", 404, param="model")
        return requested

    def max_tokens_for(self, prompt_len: int, requested: int | None) -> int:
        L = self.max_model_len
        if prompt_len >= L:
            raise OpenAIError(
                f"This model's maximum context length is {L} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input messages.",
                param="input_tokens")
        if requested is None:
            room = L - prompt_len
            return min(room, self.default_max_new_tokens) if self.default_max_new_tokens else room
        if requested > L or prompt_len + requested > L:
            raise OpenAIError(
                f"This model's maximum context length is {L} tokens. However, you requested "
                f"{requested} output tokens and your prompt contains {prompt_len} input tokens, for a "
                f"total of {prompt_len + requested} tokens. Please reduce the length of the input "
                "prompt or the number of requested output tokens.",
                param="max_tokens" if requested > L else "input_tokens")
        return requested

    @property
    def max_prompt_chars(self) -> int:
        return MAX_PROMPT_CHARS_PER_TOKEN * self.max_model_len

    def check_prompt_chars(self, text: str) -> None:
        """Refuse a text far too long for the context before spending tokenizer time on it."""
        if len(text) > self.max_prompt_chars:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(text)} characters, more than the limit of {self.max_prompt_chars} "
                f"({MAX_PROMPT_CHARS_PER_TOKEN} per token of context).", param="input_tokens")

    def check_image_count(self, n: int, where: str, param: str) -> None:
        """Refuse a request's `n` images before any is fetched or decoded: the model has no vision
        tower (`where` names what holds them, e.g. "The prompt contains a markdown image"), or
        there are more than --limit-mm-per-prompt allows."""
        if not n:
            return
        proc = getattr(self.llm, "mm_processor", None)
        if proc is None:
            raise OpenAIError(f"{where}, but this model does not accept image input (it has no vision tower)",
                              param=param)
        try:
            proc.check_image_count(n)
        except ValueError as e:
            raise OpenAIError(str(e), param=param) from None

    def sse(self, gen) -> SSEResponse:
        return SSEResponse(gen, write_timeout=self.settings.stream_write_timeout)

    def prepare(self, token_ids: list[int], request, text: str | None = None) -> Prepared:
        """Length, sampling and vocabulary checks in the caller's thread: a bad request gets its
        400 before anything reaches the engine."""
        k = getattr(request, "truncate_prompt_tokens", None)
        if k is not None and (k >= 1 or k == -1):  # the last k tokens (-1: as many as leave room)
            token_ids = token_ids[-(self.max_model_len - 1 if k == -1 else k):]
        max_tokens = self.max_tokens_for(len(token_ids), request.requested_max_tokens())
        params = request.to_sampling_params(max_tokens, self.sampling_defaults)
        self.llm.check_prompt(token_ids, params)
        params.verify(self.vocab_size, self.settings.max_logprobs)
        if params.structured_outputs is not None:  # compiled (and cached) here, off the engine thread
            try:
                self.llm.structured_output.compile(params)
            except SamplingParamsError as e:
                raise OpenAIError(str(e), param=request.structured_outputs_source() or e.parameter) from None
        return Prepared(token_ids, params, text)

    def log_ignored_fields(self, request) -> None:
        """Log request fields herd does not know (and so ignores), once per field name, as vLLM logs them."""
        new = sorted(set(request.model_extra or ()) - self.settings.ignored_fields)
        if new:
            self.settings.ignored_fields.update(new)
            logger.warning("The following fields were present in the request but ignored: %s", new)

    def new_request_id(self, prefix: str, request) -> str:
        return request.request_id or f"{prefix}-{uuid.uuid4().hex}"

    # -- generation -------------------------------------------------------------------------
    async def generate(self, prep: Prepared, request_id: str) -> AsyncIterator[RequestOutput]:
        """The engine's cumulative outputs for one prompt; records the request's metrics."""
        if self.settings.log_requests:
            logger.info("request %s: %d prompt tokens, params %s", request_id, len(prep.token_ids),
                        prep.params)
        out, last_time, reason = None, None, "error"
        try:
            prompt = prep.token_ids if prep.mm is None else {
                "prompt": prep.text, "prompt_token_ids": prep.token_ids, "multi_modal_inputs": prep.mm}
            stream = self.engine.generate(prompt, prep.params, request_id, prompt_text=prep.text)
            async with aclosing(stream):
                async for out in stream:
                    t = out.metrics.last_token_time if out.metrics else None
                    if t is not None and last_time is not None and t > last_time:
                        self.metrics.observe_token_gap(t - last_time)
                    last_time = t
                    yield out
            reason = None
        except (GeneratorExit, asyncio.CancelledError):
            reason = "abort"
            raise
        finally:
            if reason is None and out is not None and out.finished:
                self.metrics.observe_request(out, prep.params.max_tokens, prep.params.n)
            else:
                self.metrics.count_finished(reason or "abort", prep.params.n)

    async def merged(self, preps: list[Prepared], base_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run every prompt at once; yield (prompt index, output) as outputs arrive. Closing this
        generator cancels all of them."""
        if len(preps) == 1:
            async with aclosing(self.generate(preps[0], base_id)) as stream:
                async for out in stream:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, prep: Prepared):
            try:
                async with aclosing(self.generate(prep, f"{base_id}-{i}")) as stream:
                    async for out in stream:
                        queue.put_nowait((i, out))
                queue.put_nowait((i, done))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(preps)]
        remaining = len(tasks)
        try:
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, preps: list[Prepared], base_id: str) -> list[RequestOutput]:
        final: list[RequestOutput | None] = [None] * len(preps)
        async with aclosing(self.merged(preps, base_id)) as stream:
            async for i, out in stream:
                final[i] = out
        return final

    # -- formatting -------------------------------------------------------------------------
    def token_str(self, token_id: int, lp: Logprob | None, as_id: bool = False) -> str:
        if as_id:  # vLLM's return_tokens_as_token_ids: distinct tokens never collide
            return f"token_id:{token_id}"
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(self, token_ids: list[int], positions: list, text_offset: int,
                            as_ids: bool = False) -> dict:
        """Legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, positions):
            sampled = entry.get(token_id) if entry else None
            token = self.token_str(token_id, sampled, as_ids)
            tokens.append(token)
            offsets.append(text_offset)
            text_offset += len(token)
            if entry is None:  # the first prompt token has no logprob
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(max(sampled.logprob, _MIN_LOGPROB) if sampled else None)
            tops.append({self.token_str(t, lp, as_ids): max(lp.logprob, _MIN_LOGPROB) for t, lp in entry.items()})
        return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens,
                "top_logprobs": tops}

    def chat_logprobs(self, token_ids: list[int], positions: list, top_n: int, as_ids: bool = False) -> dict:
        """Chat format: content[{token, logprob, bytes, top_logprobs[{token, logprob, bytes}]}]."""
        def item(token_id, lp):
            token = self.token_str(token_id, lp, as_ids)
            return {"token": token, "logprob": max(lp.logprob, _MIN_LOGPROB),
                    "bytes": list(token.encode("utf-8"))}

        content = []
        for token_id, entry in zip(token_ids, positions):
            entry = entry or {}
            sampled = entry.get(token_id) or Logprob(float("-inf"))
            limit = len(entry) if top_n == -1 else top_n  # -1: every logprob the engine returned
            ranked = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank and lp.rank <= limit)
            content.append({**item(token_id, sampled),
                            "top_logprobs": [item(t, entry[t]) for _, t in ranked[:limit]]})
        return {"content": content}


def prompt_text_offsets(tokenizer, token_ids: list[int], text: str, skip_special_tokens: bool) -> list[int]:
    """Where each prompt token starts in the echoed prompt text: the length of the text the tokens
    before it decode to (so an added BOS, or the first bytes of a split character, take no room),
    capped at len(text). Non-decreasing, and never past the completion's first offset."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    offsets = []
    for token_id in token_ids:
        offsets.append(min(len(detok.output_text), len(text)))
        detok.add(token_id)
    return offsets


def prompt_logprobs_json(prompt_logprobs) -> list | None:
    """vLLM's `prompt_logprobs` field: per prompt position, token id -> {logprob, rank, decoded_token}."""
    if prompt_logprobs is None:
        return None
    return [None if d is None else {str(t): {"logprob": max(lp.logprob, _MIN_LOGPROB), "rank": lp.rank,
                                             "decoded_token": lp.decoded_token} for t, lp in d.items()}
            for d in prompt_logprobs]


def finish_fields(out: CompletionOutput) -> dict:
    return {"finish_reason": out.finish_reason, "stop_reason": out.stop_reason}


def now() -> int:
    return int(time.time())
