"""Grammar engines behind one interface (abstract.py); `make_backend` builds the configured one."""
from __future__ import annotations

from herd.structured_output.backends.abstract import (CompiledGrammar, GrammarOptions, StructuredOutputBackend,
                                                      StructuredOutputError, StructuredOutputGrammar)


def make_backend(name: str, tokenizer, vocab_size: int, eos_token_ids) -> StructuredOutputBackend:
    """`name` is already resolved (herd.structured_output.config.resolve_backend)."""
    if name == "guidance":
        from herd.structured_output.backends.guidance import GuidanceBackend
        return GuidanceBackend(tokenizer, vocab_size, eos_token_ids)
    raise ValueError(f"unknown structured outputs backend {name!r}")


__all__ = ["CompiledGrammar", "GrammarOptions", "StructuredOutputBackend", "StructuredOutputError",
           "StructuredOutputGrammar", "make_backend"]
