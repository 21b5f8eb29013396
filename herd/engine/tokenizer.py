"""Tokenizer loading, chat template, incremental detokenization and stop strings."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from herd.engine.outputs import Logprob

# Prompt tokens kept as left context when decoding the first output tokens, so tokenizers whose
# decoder strips a leading space at the start of text still give the space of the first word.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


# ---- loading -----------------------------------------------------------------------------------

def get_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """Load the tokenizer of a local checkpoint folder (tokenizer.json + tokenizer_config.json)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load a tokenizer from {str(path)!r} (expected tokenizer.json "
                         f"and tokenizer_config.json): {e}") from e
    if not tokenizer.chat_template:
        # Multimodal checkpoints may ship the template beside the tokenizer files only.
        template = _read_chat_template_file(path)
        if template:
            tokenizer.chat_template = template
    return tokenizer


def _read_chat_template_file(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = path / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text(encoding="utf-8")).get("chat_template")
    return None


def load_generation_config(path: str | os.PathLike) -> dict[str, Any]:
    """generation_config.json of a checkpoint, or {} when it has none."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    return json.loads(file.read_text(encoding="utf-8"))


def get_eos_token_ids(path: str | os.PathLike, tokenizer=None) -> set[int]:
    """Every id that ends generation: generation_config.json eos_token_id (int or list) plus the
    tokenizer's EOS (Llama 4 instruct: <|end_of_text|>, <|eom|>, <|eot|>)."""
    ids = load_generation_config(path).get("eos_token_id")
    eos = set() if ids is None else ({ids} if isinstance(ids, int) else set(ids))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return eos


# ---- chat template -----------------------------------------------------------------------------

def _normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-style messages -> what HF chat templates expect.

    Image parts (image_url / input_image) become {"type": "image"}; tool-call arguments given
    as JSON strings are parsed, so templates that `tojson` them do not double-encode.
    """
    out = []
    for message in messages:
        message = copy.deepcopy(dict(message))
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image_url", "input_image", "image"):
                    parts.append({"type": "image"})
                elif kind in ("text", "input_text"):
                    parts.append({"type": "text", "text": part.get("text", "")})
                else:
                    raise ValueError(f"unsupported message content part {part!r}")
            message["content"] = parts
        for call in message.get("tool_calls") or ():
            fn = call.get("function", call)
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    pass  # leave free text as the model wrote it
        out.append(message)
    return out


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None, chat_template: str | None = None,
                        continue_final_message: bool = False, tokenize: bool = True,
                        **chat_template_kwargs):
    """Render the checkpoint's chat template; return token ids (tokenize) or the prompt text.

    The template already emits <|begin_of_text|>, so the text is encoded with
    add_special_tokens=False (a second BOS would change the model's output).
    """
    template = chat_template or tokenizer.chat_template
    if not template:
        raise ValueError(
            f"the tokenizer at {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template "
            "(none in tokenizer_config.json, chat_template.jinja or chat_template.json); pass one "
            "with --chat-template or send a plain completion prompt instead")
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    text = tokenizer.apply_chat_template(
        _normalize_messages(messages), tools=tools, chat_template=template, tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, **chat_template_kwargs)
    if not tokenize:
        return text
    return tokenizer.encode(text, add_special_tokens=False)


# ---- logprob token strings ---------------------------------------------------------------------

def decode_logprob_tokens(tokenizer, positions: list[dict[int, Logprob] | None]) -> None:
    """Fill Logprob.decoded_token (each token decoded on its own, special tokens by name)."""
    cache: dict[int, str] = {}
    for d in positions:
        for token_id, lp in (d or {}).items():
            if lp.decoded_token is None:
                if token_id not in cache:
                    cache[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
                lp.decoded_token = cache[token_id]


# ---- stop strings ------------------------------------------------------------------------------

def check_stop_strings(output_text: str, new_char_count: int, stop: list[str],
                       include_stop_str_in_output: bool) -> tuple[str, int] | None:
    """Find a stop string that ends in the last new_char_count characters.

    Returns (stop_str, truncate_to), truncate_to = -1 meaning no truncation is needed; None when
    nothing matched. Only the new tail (plus len(stop_str) - 1 characters before it) is searched.
    The earliest match wins, so text after it is never returned.
    """
    if not new_char_count or not stop:
        return None
    best: tuple[str, int] | None = None
    for stop_str in stop:
        start = max(0, len(output_text) - new_char_count - len(stop_str) + 1)
        index = output_text.find(stop_str, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop_str, index)
    if best is None:
        return None
    stop_str, index = best
    if not include_stop_str_in_output:
        return stop_str, index
    end = index + len(stop_str)
    return stop_str, (-1 if end >= len(output_text) else end)


def partial_stop_length(text: str, stop: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string. Checked per
    streamed chunk, so it must not grow with the text: only the last max(len(stop)) - 1
    characters are looked at, and only where a stop string's first character occurs."""
    longest_stop = max((len(x) for x in stop), default=0)
    if longest_stop < 2 or not text:
        return 0
    tail = text[-(longest_stop - 1):]
    longest = 0
    for stop_str in stop:
        if len(stop_str) < 2:
            continue
        first = stop_str[0]
        p = tail.find(first, max(0, len(tail) - (len(stop_str) - 1)))
        while p != -1 and len(tail) - p > longest:
            if stop_str.startswith(tail[p:]):
                longest = len(tail) - p
                break
            p = tail.find(first, p + 1)
    return longest



# ---- incremental detokenizer -------------------------------------------------------------------

def rust_decoder(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer when calling its decode
    directly gives exactly tokenizer.decode(ids, skip_special_tokens=...) (the stock fast decode,
    no clean-up of tokenization spaces), else None. transformers' wrapper costs ~10 us a call
    (argument conversion) against ~2 us for the decode itself, and the detokenizer makes two
    calls per generated token."""
    try:
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
        from tokenizers import Tokenizer
    except ImportError:
        return None
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (getattr(tokenizer, "is_fast", False) and isinstance(backend, Tokenizer)
            and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
            and getattr(cls, "decode", None) is PreTrainedTokenizerBase.decode
            and getattr(cls, "_decode", None) is PreTrainedTokenizerFast._decode):
        return backend
    return None


class IncrementalDetokenizer:
    """Turns sampled token ids into text deltas, one token at a time.

    Byte-level BPE splits multi-byte UTF-8 characters across tokens; a decode that ends in U+FFFD
    is therefore held back until a later token completes the character (or flush() at the end).
    Only a short window of tokens is decoded per step: tokens from the previous emission point on.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int] | None = None,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False,
                 min_tokens: int = 0):
        self.tokenizer = tokenizer
        self._rust = rust_decoder(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.output_token_ids: list[int] = []
        self.output_text = ""
        context = list(prompt_token_ids or [])[-_PROMPT_CONTEXT_TOKENS:]
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []  # prompt cut mid-character: its bytes would swallow the first output
        self._tokens = context        # decode window source: prompt context + outputs
        self._prefix_offset = 0       # window start (already-emitted context for the decoder)
        self._read_offset = len(context)  # tokens before this are emitted
        self._sent_offset = 0         # characters of output_text handed out by get_next_output_text

    @classmethod
    def from_params(cls, tokenizer, prompt_token_ids: list[int], params) -> "IncrementalDetokenizer":
        return cls(tokenizer, prompt_token_ids, params.skip_special_tokens,
                   params.spaces_between_special_tokens, params.stop,
                   params.include_stop_str_in_output, params.min_tokens)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._rust is not None:
            return self._rust.decode(ids, skip_special_tokens=self.skip_special_tokens)
        kwargs = {"skip_special_tokens": self.skip_special_tokens}
        if not getattr(self.tokenizer, "is_fast", True):
            # Only Python ("slow") tokenizers honour this; fast ones never insert the spaces.
            kwargs["spaces_between_special_tokens"] = self.spaces_between_special_tokens
        return self.tokenizer.decode(ids, **kwargs)

    def _advance(self, allow_replacement: bool) -> str:
        prefix_text = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset:])
        if len(new_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token
        if new_text.endswith(_REPLACEMENT) and not allow_replacement:
            return ""  # an unfinished character: wait for its next bytes
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self.output_text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be "")."""
        self.output_token_ids.append(token_id)
        self._tokens.append(token_id)
        return self._advance(allow_replacement=False)

    def flush(self) -> str:
        """At the end of generation: emit held-back bytes that never formed a character."""
        return self._advance(allow_replacement=True)

    def update(self, new_token_ids: list[int], stop_terminated: bool = False,
               finished: bool = False) -> str | None:
        """Add a step's tokens and check stop strings; returns the stop string that matched.

        stop_terminated: the last token is EOS or a stop_token_id; its text is left out unless
        include_stop_str_in_output. finished: the request ends now, flush held-back bytes.
        On a match output_text is truncated (before the stop string, or after it when included).
        """
        to_decode = new_token_ids
        if stop_terminated and not self.include_stop_str_in_output and new_token_ids:
            to_decode = new_token_ids[:-1]
        start_len = len(self.output_text)
        for token_id in to_decode:
            self.add(token_id)
        if len(to_decode) < len(new_token_ids):
            self.output_token_ids.append(new_token_ids[-1])
        if finished or stop_terminated:
            self.flush()
        if not self.stop or len(self.output_token_ids) <= self.min_tokens:
            return None
        match = check_stop_strings(self.output_text, len(self.output_text) - start_len, self.stop,
                                   self.include_stop_str_in_output)
        if match is None:
            return None
        stop_str, truncate_to = match
        if truncate_to != -1:
            self.output_text = self.output_text[:truncate_to]
        return stop_str

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to stream now: the new part (delta) or all of it, minus a possible partial stop
        string at the end while the request is still running."""
        end = len(self.output_text)
        if not finished and self.stop and not self.include_stop_str_in_output:
            end -= partial_stop_length(self.output_text, self.stop)
        if not delta:
            return self.output_text[:end]
        start = self._sent_offset
        if end <= start:
            return ""
        self._sent_offset = end
        return self.output_text[start:end]
