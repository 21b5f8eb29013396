"""SamplingParams: per-request decoding options, with vLLM's names, defaults and error messages."""
from __future__ import annotations

import copy
import enum
import json
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any

logger = logging.getLogger(__name__)

# Below this temperature a request is greedy (argmax).
SAMPLING_EPS = 1e-5
# Smaller positive temperatures overflow logits / temperature; they are raised to this.
MIN_TEMPERATURE = 1e-2
# Most bad_words one request may give: each is tokenized twice in add_request (on the engine
# thread) and checked against the output every step, so the count bounds both costs.
MAX_BAD_WORDS = 1024
# OpenAI's range for a logit_bias value.
MAX_LOGIT_BIAS = 100.0
# Most alternatives of one `choice` constraint (each becomes a grammar branch).
MAX_CHOICES = 1024


class SamplingParamsError(ValueError):
    """A bad sampling parameter; `parameter` names it for the HTTP error body."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


# The constraint kinds of StructuredOutputsParams; a request sets exactly one of them.
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """vLLM's structured outputs: exactly one of json (a JSON schema: dict, JSON text or a pydantic
    model class), regex, choice (list of strings), grammar (Lark or GBNF/EBNF), json_object (any JSON
    object) or structural_tag (JSON text: {"structures": [{"begin", "schema", "end"}], "triggers"})."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False                  # accepted; there is one backend to fall back to
    disable_any_whitespace: bool | None = None      # JSON without free whitespace; None: the engine's default
    disable_additional_properties: bool | None = None  # objects with properties and no additionalProperties
                                                       # allow no others; None: the engine's default
    whitespace_pattern: str | None = None           # regex for the whitespace JSON may use
    structural_tag: str | None = None
    backend: str | None = None                      # older per-request backend name; checked by the engine

    def __post_init__(self) -> None:
        err = SamplingParamsError
        if self.json is not None and not isinstance(self.json, (str, dict, bool)):
            schema = getattr(self.json, "model_json_schema", None)  # a pydantic model class
            if not callable(schema):
                raise err(f"structured_outputs.json must be a JSON schema (a dict or JSON text), got "
                          f"{type(self.json).__name__}", "structured_outputs")
            self.json = schema()
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise err(f"structured_outputs.json is not valid JSON: {e}", "structured_outputs") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise err("structured_outputs.json must be a JSON schema object", "structured_outputs")
        if self.json_object is False:
            self.json_object = None
        set_kinds = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) is not None]
        if len(set_kinds) != 1:
            which = "multiple are specified: " + ", ".join(set_kinds) if set_kinds else "none is specified"
            raise err(f"You must use exactly one kind of structured outputs constraint "
                      f"({', '.join(STRUCTURED_OUTPUT_KINDS)}), but {which}.", "structured_outputs")
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise err(f"structured_outputs.{name} must be a non-empty string", "structured_outputs")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise err("structured_outputs.choice must be a list of strings", "structured_outputs")
            self.choice = list(self.choice)
            if not self.choice:
                raise err("structured_outputs.choice must not be empty", "structured_outputs")
            if len(self.choice) > MAX_CHOICES:
                raise err(f"structured_outputs.choice may have at most {MAX_CHOICES} entries, got "
                          f"{len(self.choice)}", "structured_outputs")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) is not None)

    @classmethod
    def from_optional(cls, **kwargs) -> "StructuredOutputsParams | None":
        """None when no constraint is given (vLLM's GuidedDecodingParams.from_optional)."""
        if all(kwargs.get(k) in (None, False) for k in STRUCTURED_OUTPUT_KINDS):
            return None
        return cls(**kwargs)

    @classmethod
    def coerce(cls, value) -> "StructuredOutputsParams | None":
        """A StructuredOutputsParams, a dict of its fields, or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise SamplingParamsError("structured_outputs must be an object with one of "
                                      f"{', '.join(STRUCTURED_OUTPUT_KINDS)}", "structured_outputs")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SamplingParamsError(f"unknown structured_outputs field(s) {unknown}; known: {sorted(known)}",
                                      "structured_outputs")
        return cls(**value)


# vLLM's name before 0.10.2.
GuidedDecodingParams = StructuredOutputsParams


class RequestOutputKind(enum.IntEnum):
    """What each streamed output of a request carries (vLLM's names): everything so far, only what
    is new since the last output, or nothing until the request finishes."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16          # None: up to the model's context length
    min_tokens: int = 0
    logprobs: int | None = None          # top-N per generated token; -1 = whole vocab
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None   # older vLLM spelling of structured_outputs
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # of AsyncLLMEngine.generate's outputs
    truncate_prompt_tokens: int | None = None   # keep only the prompt's last k tokens (-1: max_model_len)
    detokenize: bool = True                     # False: token ids only, text stays ""
    extra_args: dict[str, Any] | None = None    # carried along for custom code; herd reads none of it
    # Per-request callables fn(output_ids, logits) or fn(prompt_ids, output_ids, logits) -> logits
    # ([vocab] float32, before penalties and temperature); they run in the engine process.
    logits_processors: list[Any] | None = None

    # Filled in by __post_init__ and the engine, not by users.
    output_text_buffer_length: int = field(default=0, init=False, repr=False)
    eos_token_id: int | None = field(default=None, init=False, repr=False)
    all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)
    bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False)
    # bad_words_token_ids indexed for the sampler: prefix length -> {prefix: banned last tokens}
    bad_words_index: dict[int, dict[tuple[int, ...], list[int]]] | None = field(
        default=None, init=False, repr=False)
    # One sequence's grammar state (herd.structured_output.StructuredOutputRequest), set by the engine on
    # the sequence's own params; the sampler masks the row with it and the engine advances it.
    structured_output_request: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is less than %s, which may cause nan or inf in "
                           "tensors; raising it to %s.", self.temperature, MIN_TEMPERATURE,
                           MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        self.bad_words = _unique_strings(self.bad_words)
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.logit_bias is not None:
            self.logit_bias = _int_keys(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.structured_outputs is None and self.guided_decoding is not None:
            self.structured_outputs = self.guided_decoding
        elif self.structured_outputs is not None and self.guided_decoding is not None \
                and self.guided_decoding is not self.structured_outputs:
            raise SamplingParamsError("give structured_outputs or its older name guided_decoding, not both",
                                      "structured_outputs")
        self.structured_outputs = self.guided_decoding = StructuredOutputsParams.coerce(self.structured_outputs)
        # Streaming holds back this many characters so a stop string is never half-sent.
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        self._verify_args()
        if self.temperature < SAMPLING_EPS:
            # Greedy: the random-path filters are meaningless, reset them.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise SamplingParamsError(
                    f"n must be 1 when using greedy sampling, got {self.n}.", "n")
        self.all_stop_token_ids.update(self.stop_token_ids)

    def _verify_args(self) -> None:
        err = SamplingParamsError
        if not isinstance(self.n, int) or isinstance(self.n, bool):
            raise err(f"n must be an int, but is of type {type(self.n).__name__}", "n")
        if self.n < 1:
            raise err(f"n must be at least 1, got {self.n}.", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise err(f"{name} must be in [-2, 2], got {value}.", name)
        if not math.isfinite(self.repetition_penalty):
            raise err(f"repetition_penalty must be a finite number, got {self.repetition_penalty}.",
                      "repetition_penalty")
        if self.repetition_penalty <= 0.0:
            raise err("repetition_penalty must be greater than zero, got "
                      f"{self.repetition_penalty}.", "repetition_penalty")
        if not math.isfinite(self.temperature):
            raise err(f"temperature must be a finite number, got {self.temperature}.", "temperature")
        if self.temperature < 0.0:
            raise err(f"temperature must be non-negative, got {self.temperature}.", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise err(f"top_p must be in (0, 1], got {self.top_p}.", "top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise err(f"top_k must be an integer, got {type(self.top_k).__name__}", "top_k")
        if self.top_k < -1:
            raise err(f"top_k must be 0 (disable), -1 (disable), or at least 1, got {self.top_k}.",
                      "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise err(f"min_p must be in [0, 1], got {self.min_p}.", "min_p")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise err(f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")
        if self.min_tokens < 0:
            raise err(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.",
                      "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise err(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                      f"got {self.min_tokens}.", "min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value != -1 and value < 0:
                raise err(f"{name} must be non-negative or -1, got {value}.", name)
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise err(f"stop_token_ids must contain only integers, got {self.stop_token_ids}.",
                      "stop_token_ids")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise err("stop cannot contain an empty string.", "stop")
        if any(not w for w in self.bad_words):
            raise err(f"bad_words cannot contain an empty string. Got bad_words={self.bad_words}",
                      "bad_words")
        if self.truncate_prompt_tokens is not None and (
                not isinstance(self.truncate_prompt_tokens, int) or isinstance(self.truncate_prompt_tokens, bool)
                or self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1):
            raise err(f"truncate_prompt_tokens must be >= 1 or -1, got {self.truncate_prompt_tokens}",
                      "truncate_prompt_tokens")
        if not self.detokenize and self.stop:
            raise err("stop strings are only supported when detokenize is True. Set detokenize=True to use "
                      "stop.", "stop")
        if self.logits_processors is not None and not all(callable(f) for f in self.logits_processors):
            raise err("logits_processors must be a list of callables", "logits_processors")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise err("extra_args must be a dict", "extra_args")
        self.output_kind = RequestOutputKind(self.output_kind)
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise err("allowed_token_ids is not None and empty!", "allowed_token_ids")

    # ---- properties ---------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def num_logprobs(self, vocab_size: int) -> int | None:
        """Top-N count to return per generated token (-1 resolved to the vocab size)."""
        return vocab_size if self.logprobs == -1 else self.logprobs

    def num_prompt_logprobs(self, vocab_size: int) -> int | None:
        return vocab_size if self.prompt_logprobs == -1 else self.prompt_logprobs

    # ---- checks that need the model -----------------------------------------------------------
    def verify(self, vocab_size: int, max_logprobs: int = 20) -> None:
        """Checks against the model: logprob limits (--max-logprobs, -1 = vocab) and token ids."""
        limit = vocab_size if max_logprobs == -1 else max_logprobs
        for name, label in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
            value = getattr(self, name)
            if value:
                value = vocab_size if value == -1 else value
                if value > limit:
                    raise SamplingParamsError(
                        f"Requested {label} logprobs of {value}, which is greater than max "
                        f"allowed: {limit}", name)
        if self.top_k > vocab_size:
            raise SamplingParamsError(f"top_k cannot be greater than vocabulary size({vocab_size}), "
                                      f"but got {self.top_k}.", "top_k")
        for name, ids in (("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", list(self.logit_bias or ())),
                          ("allowed_token_ids", self.allowed_token_ids or [])):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise SamplingParamsError(f"token_id(s) {bad} in {name} contain out-of-vocab token "
                                          f"ids. Vocabulary size: {vocab_size}", name)

    # ---- engine-side updates ------------------------------------------------------------------
    def update_from_generation_config(self, generation_config: dict[str, Any],
                                      eos_token_id: int | None = None) -> None:
        """Register the model's EOS ids (vLLM semantics).

        `eos_token_id` is the tokenizer's EOS; it stops generation unless ignore_eos. Extra EOS ids
        from generation_config.json become stop_token_ids (unless ignore_eos). All of them are in
        `all_stop_token_ids`, which min_tokens masks even with ignore_eos.
        """
        if not self.ignore_eos:
            self.eos_token_id = eos_token_id
        if eos_token_id is not None:
            self.all_stop_token_ids.add(eos_token_id)
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None:
            return
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        eos_ids.discard(eos_token_id)
        if eos_ids:
            self.all_stop_token_ids.update(eos_ids)
            if not self.ignore_eos:
                self.stop_token_ids = list(dict.fromkeys([*self.stop_token_ids, *sorted(eos_ids)]))

    def update_from_tokenizer(self, tokenizer) -> None:
        """Tokenize bad_words, both as written and with a leading space (word-initial form)."""
        if not self.bad_words:
            return
        sequences: dict[tuple[int, ...], None] = {}  # insertion-ordered set: linear de-duplication
        for word in self.bad_words:
            for prefix in ("", " "):
                ids = tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
                if not ids:
                    if not prefix:
                        raise SamplingParamsError(
                            "bad_words entries must tokenize to at least one token.", "bad_words")
                    continue
                sequences.setdefault(tuple(ids), None)
        self.bad_words_token_ids = [list(ids) for ids in sequences]
        self.bad_words_index = bad_words_index(self.bad_words_token_ids)

    # ---- copies -------------------------------------------------------------------------------
    def clone(self) -> "SamplingParams":
        # A copy never shares (or copies) a sequence's grammar state: the memo maps it to None.
        return copy.deepcopy(self, {id(self.structured_output_request): None})

    def for_child(self, index: int) -> "SamplingParams":
        """Params of the index-th of n samples: n=1 and, when seeded, seed + index (vLLM V1)."""
        child = self.clone()
        child.n = 1
        if self.seed is not None:
            child.seed = self.seed + index
        return child


@dataclass
class BeamSearchParams:
    """LLM.beam_search's parameters (vLLM's): keep the `beam_width` most likely continuations,
    ranked by cumulative logprob / length ** length_penalty."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise SamplingParamsError(f"beam_width must be at least 1, got {self.beam_width}.", "beam_width")
        if self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")


def bad_words_index(sequences) -> dict[int, dict[tuple[int, ...], list[int]]]:
    """Token sequences -> {prefix length: {prefix: banned last tokens}} for the sampler's check."""
    index: dict[int, dict[tuple[int, ...], list[int]]] = {}
    for ids in sequences:
        index.setdefault(len(ids) - 1, {}).setdefault(tuple(ids[:-1]), []).append(ids[-1])
    return index


def _unique_strings(words) -> list[str]:
    """bad_words as a list of distinct strings, in order; at most MAX_BAD_WORDS of them."""
    if words is None:
        return []
    if isinstance(words, str):
        words = [words]
    words = list(words)
    if any(not isinstance(w, str) for w in words):
        raise SamplingParamsError("bad_words must be a list of strings.", "bad_words")
    unique = list(dict.fromkeys(words))
    if len(unique) > MAX_BAD_WORDS:
        raise SamplingParamsError(f"bad_words may contain at most {MAX_BAD_WORDS} distinct words, got "
                                  f"{len(unique)}.", "bad_words")
    return unique


def _int_keys(logit_bias: dict) -> dict[int, float]:
    """JSON gives logit_bias keys as strings; accept anything int() understands. Values must be
    finite numbers in OpenAI's range [-100, 100]."""
    if not isinstance(logit_bias, dict):
        raise SamplingParamsError("logit_bias must be a mapping of token ids to numbers.", "logit_bias")
    out, bad, bad_values = {}, [], []
    for key, value in logit_bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError, OverflowError):
            bad.append(key)
            continue
        try:
            bias = float(value)
        except (TypeError, ValueError, OverflowError):
            bias = math.nan
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # NaN fails this too
            bad_values.append(key)
        out[token] = bias
    if bad:
        raise SamplingParamsError(f"logit_bias contains key(s) that cannot be converted to integer "
                                  f"token IDs: {bad!r}", "logit_bias")
    if bad_values:
        raise SamplingParamsError(f"logit_bias values must be finite numbers in [-{MAX_LOGIT_BIAS:g}, "
                                  f"{MAX_LOGIT_BIAS:g}]; got {[logit_bias[k] for k in bad_values[:5]]!r} "
                                  f"for token id(s) {bad_values[:5]!r}", "logit_bias")
    return out
