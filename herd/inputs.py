"""Prompt shapes LLM.generate / beam_search take, by vLLM's names (vllm.inputs): plain dicts."""
from __future__ import annotations

from typing import Any, TypedDict


class _Text(TypedDict):
    prompt: str


class TextPrompt(_Text, total=False):
    multi_modal_data: dict[str, Any]      # {"image": image or [images]}


class _Tokens(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_Tokens, total=False):
    multi_modal_data: dict[str, Any]


# A prompt: text, token ids, or one of the dicts above.
PromptType = str | list[int] | TextPrompt | TokensPrompt
