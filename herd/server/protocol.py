"""Request models of the OpenAI-compatible API (field names and defaults as in vLLM).

Unknown JSON fields are accepted and ignored, as vLLM does. Responses are plain dicts built by
the serving modules.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from herd.engine.sampling_params import MAX_BAD_WORDS, SamplingParams, SamplingParamsError, StructuredOutputsParams
from herd.server.errors import ParamError
from herd.server.tool_parsers.tool_choice import named_tool_schema, required_tools_schema

_INT64 = dict(ge=-(2 ** 63), le=2 ** 63 - 1)
# Most samples one request may ask for (OpenAI's own limit); each is a sequence in the engine.
MAX_N = 128
# Per-request limits, so that what a request costs the server (event loop, engine thread, memory)
# is proportional to its size and bounded (docs/reliability.md, "Attacks (server)").
MAX_PROMPTS = 1024            # prompts in one /v1/completions request
MAX_STOP_STRINGS = 64         # `stop` entries (checked against the output tail every token)
MAX_STOP_STRING_CHARS = 256   # characters in one stop string
MAX_BAD_WORD_CHARS = 256      # characters in one `bad_words` entry (their count: the engine's MAX_BAD_WORDS)
MAX_STOP_TOKEN_IDS = 1024     # `stop_token_ids` entries
MAX_LOGIT_BIAS = 1024         # `logit_bias` entries (OpenAI allows 300)
MAX_TOOLS = 256               # `tools` entries (OpenAI allows 128)

# Sampling fields whose default comes from the checkpoint's generation_config.json when unset.
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# vLLM's older request fields for structured outputs -> StructuredOutputsParams fields.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


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
    truncate_prompt_tokens: int | None = None   # keep the prompt's last k tokens (-1: as many as fit)
    # structured outputs: vLLM's field, OpenAI's response_format, and vLLM's older guided_* fields
    structured_outputs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _check_stream(self):
        if self.n > MAX_N:
            raise ParamError(f"n must be at most {MAX_N}, got {self.n}.", "n")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        _check_list("stop", stops, MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS)
        # distinct words, as the engine counts them (repeats cost nothing)
        _check_list("bad_words", list(dict.fromkeys(self.bad_words or [])), MAX_BAD_WORDS, MAX_BAD_WORD_CHARS)
        _check_list("stop_token_ids", self.stop_token_ids or [], MAX_STOP_TOKEN_IDS)
        _check_list("logit_bias", self.logit_bias or {}, MAX_LOGIT_BIAS)
        if self.stream_options is not None and not self.stream:
            raise ParamError("Stream options can only be defined when `stream=True`.", "stream_options")
        if self.stream and self.prompt_logprobs is not None:
            raise ParamError("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        # a malformed constraint is a 400 before anything runs (tool choices: ChatCompletionRequest)
        _SamplingRequest.structured_outputs_params(self)
        return self

    def _response_format_params(self) -> dict[str, Any] | None:
        """OpenAI's response_format -> StructuredOutputsParams fields (None for text)."""
        fmt = self.response_format
        if fmt is None:
            return None
        kind = fmt.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return {"json_object": True}
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise ParamError("response_format of type json_schema needs a `json_schema` object", "response_format")
            schema = spec.get("schema")
            if schema is None:  # OpenAI allows leaving it out: any JSON object
                return {"json_object": True}
            return {"json": schema}
        if kind == "structural_tag":
            return {"structural_tag": json.dumps({k: fmt.get(k) for k in ("structures", "triggers")})}
        raise ParamError(f"response_format type {kind!r} is not supported; use text, json_object, json_schema or "
                         "structural_tag", "response_format")

    def structured_outputs_source(self) -> str | None:
        """The request field the constraint comes from (the `param` of its errors)."""
        for name in ("structured_outputs", *_GUIDED_FIELDS):
            if getattr(self, name) is not None:
                return name
        if self.response_format is not None and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        sources = {}
        if self.structured_outputs is not None:
            sources["structured_outputs"] = dict(self.structured_outputs)
        for name, key in _GUIDED_FIELDS.items():
            if getattr(self, name) is not None:
                sources[name] = {key: getattr(self, name)}
        from_format = self._response_format_params()
        if from_format is not None:
            sources["response_format"] = from_format
        if not sources:
            return None
        if len(sources) > 1:
            raise ParamError("You can only use one kind of structured outputs constraint but multiple are specified: "
                             + ", ".join(sources), next(iter(sources)))
        (source, fields), = sources.items()
        if self.guided_whitespace_pattern is not None:
            fields.setdefault("whitespace_pattern", self.guided_whitespace_pattern)
        if self.guided_decoding_backend is not None:
            fields.setdefault("backend", self.guided_decoding_backend)
        try:
            return StructuredOutputsParams.coerce(fields)
        except SamplingParamsError as e:
            raise ParamError(str(e), source) from None
        except TypeError as e:  # a field of the wrong type
            raise ParamError(f"bad structured outputs field: {e}", source) from None

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
            logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids,
            structured_outputs=self.structured_outputs_params(),
            truncate_prompt_tokens=self.truncate_prompt_tokens, **kw)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    suffix: str | None = None  # refused with vLLM's 400 (serving_completion)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _check_prompt(self):
        p = self.prompt
        if isinstance(p, list) and (not p or any(isinstance(x, list) and not x for x in p)):
            raise ParamError("prompt must not be empty", "prompt")
        if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) > MAX_PROMPTS:
            raise ParamError(f"a request may have at most {MAX_PROMPTS} prompts, got {len(p)}.", "prompt")
        return self

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: score the prompt (its text and, with logprobs, its logprobs)."""
        return self.echo and self.max_tokens == 0

    def requested_max_tokens(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens  # the engine samples one token; it is dropped

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
        self._check_tools()
        return self

    def _check_tools(self):
        tools = self.tools
        if tools is not None:
            _check_list("tools", tools, MAX_TOOLS)
            for i, tool in enumerate(tools):
                fn = tool.get("function") if isinstance(tool, dict) else None
                if tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                        or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise ParamError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                     "\"parameters\": {...}}}", "tools")
                if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                    raise ParamError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        if tools and self.tool_choice is None:
            self.tool_choice = "auto"  # OpenAI's default when tools are given
        choice = self.tool_choice
        if choice is None or choice == "none":
            return
        if isinstance(choice, str) and choice not in ("auto", "required"):
            raise ParamError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                             "tool_choice")
        if not tools:
            raise ParamError("When using `tool_choice`, `tools` must be set.", "tool_choice")
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ParamError('a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice")
            if fn["name"] not in [t["function"]["name"] for t in tools]:
                raise ParamError(f"Tool '{fn['name']}' has not been passed in `tools`.", "tool_choice")
        if self.tool_choice_mode in ("required", "named"):
            if super().structured_outputs_source() is not None:
                raise ParamError("You can only either use constraints for structured outputs or tools, not both.",
                                 "tool_choice")
            self.structured_outputs_params()  # a tool schema that cannot be combined is a 400 now

    def structured_outputs_source(self) -> str | None:
        if self.tool_choice_mode in ("required", "named"):
            return "tools"
        return super().structured_outputs_source()

    @property
    def tool_choice_mode(self) -> str:
        """none | auto | required | named."""
        choice = self.tool_choice
        if not self.tools or choice is None or choice == "none":
            return "none"
        return "named" if isinstance(choice, dict) else choice

    @property
    def named_tool(self) -> str | None:
        return self.tool_choice["function"]["name"] if self.tool_choice_mode == "named" else None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """Required and named tool choices are enforced with a JSON schema, as in vLLM."""
        mode = self.tool_choice_mode if self.tools else "none"
        if mode not in ("required", "named"):
            return super().structured_outputs_params()
        try:
            schema = (required_tools_schema(self.tools, self.parallel_tool_calls is not False) if mode == "required"
                      else named_tool_schema(self.tools, self.named_tool))
            return StructuredOutputsParams(json=schema)
        except (ValueError, SamplingParamsError) as e:
            raise ParamError(str(e), "tools") from None

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

