"""The interface a grammar engine implements for herd's structured outputs.

A backend compiles a constraint once (the manager caches the result), hands each sequence its own
matcher state, and fills a batch of token bitmasks: row j, bit t (word t // 32, bit t % 32) set when
token t may come next for grammars[j]. The sampler turns the bitmask into -inf logits.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from herd.engine.sampling_params import SamplingParamsError


class StructuredOutputError(SamplingParamsError):
    """A constraint the backend cannot compile (bad JSON schema, regex or grammar): a 400."""

    def __init__(self, message: str, parameter: str | None = "structured_outputs"):
        super().__init__(message, parameter)


@dataclass(frozen=True)
class GrammarOptions:
    """Compile options that change the grammar, so part of the cache key."""
    any_whitespace: bool = True            # JSON: whitespace allowed between tokens
    whitespace_pattern: str | None = None  # JSON: the regex whitespace must match


class StructuredOutputGrammar(ABC):
    """One sequence's position in its grammar."""

    @abstractmethod
    def accept_token(self, token: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more (but EOS)."""


class CompiledGrammar(ABC):
    """A compiled constraint, shared by every sequence that uses it."""

    @abstractmethod
    def new_state(self) -> StructuredOutputGrammar:
        """A fresh matcher at the grammar's start."""


class StructuredOutputBackend(ABC):
    name: str
    vocab_size: int   # bits per bitmask row (>= the model's logits width)

    @abstractmethod
    def compile(self, kind: str, spec: str, options: GrammarOptions) -> CompiledGrammar:
        """kind: json | json_object | regex | choice | grammar | structural_tag; spec is its text (a JSON
        schema / choice list / structural tag as JSON). Raises StructuredOutputError for a bad spec."""

    @abstractmethod
    def fill_bitmask(self, grammars: list[StructuredOutputGrammar], bitmask: torch.Tensor) -> None:
        """Write the allowed-token bits of grammars[j] into bitmask[j] (int32, CPU, contiguous,
        [len(grammars), bitmask_width(vocab_size)]). May run in a worker thread."""


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32
