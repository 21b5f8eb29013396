"""SamplingParams: per-request decoding options, with vLLM's names, defaults and error messages."""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
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


class SamplingParamsError(ValueError):
    """A bad sampling parameter; `parameter` names it for the HTTP error body."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


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

    # Filled in by __post_init__ and the engine, not by users.
    output_text_buffer_length: int = field(default=0, init=False, repr=False)
    eos_token_id: int | None = field(default=None, init=False, repr=False)
    all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)
    bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False)
    # bad_words_token_ids indexed for the sampler: prefix length -> {prefix: banned last tokens}
    bad_words_index: dict[int, dict[tuple[int, ...], list[int]]] | None = field(
        default=None, init=False, repr=False)

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
        return copy.deepcopy(self)

    def for_child(self, index: int) -> "SamplingParams":
        """Params of the index-th of n samples: n=1 and, when seeded, seed + index (vLLM V1)."""
        child = self.clone()
        child.n = 1
        if self.seed is not None:
            child.seed = self.seed + index
        return child


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
