"""Request models of the OpenAI-compatible API (field names and defaults as in vLLM).

Unknown JSON fields are accepted and ignored, as vLLM does. Responses are plain dicts built by
the serving modules.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from herd.engine.sampling_params import SamplingParams
from herd.server.errors import ParamError

_INT64 = dict(ge=-(2 ** 63), le=2 ** 63 - 1)
# Most samples one request may ask for (OpenAI's own limit); each is a sequence in the engine.
MAX_N = 128
# Per-request limits, so that what a request costs the server (event loop, engine thread, memory)
# is proportional to its size and bounded (docs/reliability.md, "Attacks (server)").
MAX_PROMPTS = 1024            # prompts in one /v1/completions request
MAX_STOP_STRINGS = 64         # `stop` entries (checked against the output tail every token)
MAX_STOP_STRING_CHARS = 256   # characters in one stop string
MAX_BAD_WORDS = 64            # `bad_words` entries (each tokenized twice per request)
MAX_BAD_WORD_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024     # `stop_token_ids` entries
MAX_LOGIT_BIAS = 1024         # `logit_bias` entries (OpenAI allows 300)

# Sampling fields whose default comes from the checkpoint's generation_config.json when unset.
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _lone_surrogate_at(value) -> str | None:
    """Where a string (or key) holds a lone UTF-16 surrogate: JSON can escape one ("\\ud800"),
    but it has no UTF-8 form, so the tokenizer and the response encoder would choke on it."""
    def bad(text: str) -> bool:
        try:
            text.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True

    stack = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if bad(v):
                return where or "body"
        elif isinstance(v, dict):
            for k, x in v.items():
                key = str(k).encode("utf-8", "backslashreplace").decode()  # printable in the error
                path = f"{where}.{key}" if where else key
                if isinstance(k, str) and bad(k):
                    return path
                if isinstance(x, (str, dict, list)):
                    stack.append((path, x))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v) if isinstance(x, (str, dict, list)))
    return None


def _check_list(name: str, items, max_items: int, max_chars: int | None = None) -> None:
    if len(items) > max_items:
        raise ParamError(f"`{name}` may have at most {max_items} entries, got {len(items)}.", name)
    if max_chars is not None:
        for x in items:
            if isinstance(x, str) and len(x) > max_chars:
                raise ParamError(f"each `{name}` entry may have at most {max_chars} characters, "
                                 f"got one of {len(x)}.", name)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        where = _lone_surrogate_at(data)
        if where is not None:
            raise ParamError(f"{where} contains a lone UTF-16 surrogate, which is not valid Unicode text",
                             where.split(".")[0].split("[")[0] if where != "body" else None)
        return data


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _SamplingRequest(OpenAIBaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, **_INT64)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    request_id: str | None = None
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="after")
    def _check_stream(self):
        if self.n > MAX_N:
            raise ParamError(f"n must be at most {MAX_N}, got {self.n}.", "n")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        _check_list("stop", stops, MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS)
        _check_list("bad_words", self.bad_words or [], MAX_BAD_WORDS, MAX_BAD_WORD_CHARS)
        _check_list("stop_token_ids", self.stop_token_ids or [], MAX_STOP_TOKEN_IDS)
        _check_list("logit_bias", self.logit_bias or {}, MAX_LOGIT_BIAS)
        if self.stream_options is not None and not self.stream:
            raise ParamError("Stream options can only be defined when `stream=True`.", "stream_options")
        if self.stream and self.prompt_logprobs is not None:
            raise ParamError("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _sampling_params(self, max_tokens: int, defaults: dict[str, Any], logprobs: int | None,
                         prompt_logprobs: int | None) -> SamplingParams:
        """The request's value when given, else the checkpoint default, else SamplingParams'."""
        kw = {name: getattr(self, name) if getattr(self, name) is not None else defaults.get(name)
              for name in GENERATION_DEFAULTS}
        kw = {k: v for k, v in kw.items() if v is not None}
        return SamplingParams(
            n=self.n, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, bad_words=self.bad_words,
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids, **kw)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    suffix: str | None = None  # accepted and ignored, as in vLLM
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _check_prompt(self):
        p = self.prompt
        if isinstance(p, list) and (not p or any(isinstance(x, list) and not x for x in p)):
            raise ParamError("prompt must not be empty", "prompt")
        if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) > MAX_PROMPTS:
            raise ParamError(f"a request may have at most {MAX_PROMPTS} prompts, got {len(p)}.", "prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any]) -> SamplingParams:
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None and prompt_logprobs is None:
            prompt_logprobs = self.logprobs  # echoed prompt tokens carry logprobs too
        return self._sampling_params(max_tokens, defaults, self.logprobs, prompt_logprobs)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if not self.messages:
            raise ParamError("messages must contain at least one message", "messages")
        for i, m in enumerate(self.messages):
            if not isinstance(m.get("role"), str):
                raise ParamError(f"messages[{i}] needs a string 'role'", "messages")
            # (a mapping is left to the template: Llama 4's renders tool results given as objects)
            if not isinstance(m.get("content"), (str, list, dict, type(None))):
                raise ParamError(f"messages[{i}].content must be a string or a list of content parts, "
                                 f"got {type(m['content']).__name__}", "messages")
        top = self.top_logprobs
        if top is not None:
            if top < 0 and top != -1:
                raise ParamError("`top_logprobs` must be a positive value or -1.", "top_logprobs")
            if (top == -1 or top > 0) and not self.logprobs:
                raise ParamError("when using `top_logprobs`, `logprobs` must be set to true.",
                                 "top_logprobs")
        if self.tools and self.tool_choice is None:
            self.tool_choice = "auto"  # OpenAI's default when tools are given
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any]) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, defaults, logprobs, self.prompt_logprobs)


class TokenizeRequest(OpenAIBaseModel):
    """Either a `prompt` (completion style) or chat `messages`."""
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("give exactly one of `prompt` or `messages`", "prompt")
        return self


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]

