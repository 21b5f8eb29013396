"""llguidance (https://github.com/guidance-ai/llguidance) as the grammar engine.

JSON schemas, regexes, Lark and GBNF grammars compile to one Earley parser over a lexer; masks are
computed from the token trie, and LLExecutor fills a batch of them on its own threads with the GIL
released, so the work overlaps the model's forward (herd.structured_output.manager)."""
from __future__ import annotations

import json

import torch

from herd.structured_output.backends.abstract import (CompiledGrammar, GrammarOptions, StructuredOutputBackend,
                                                      StructuredOutputError, StructuredOutputGrammar,
                                                      bitmask_width)

# Longest compile error kept in a 400's message (llguidance quotes the grammar around the error).
_MAX_ERROR_CHARS = 2000
_LABELS = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice",
           "grammar": "grammar", "structural_tag": "structural tag"}


class GuidanceGrammar(StructuredOutputGrammar):
    __slots__ = ("matcher",)

    def __init__(self, matcher):
        self.matcher = matcher

    def accept_token(self, token: int) -> bool:
        return self.matcher.consume_token(token)

    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()


class GuidanceCompiled(CompiledGrammar):
    def __init__(self, matcher):
        self._matcher = matcher  # never advanced: copies start from it

    def new_state(self) -> GuidanceGrammar:
        return GuidanceGrammar(self._matcher.deep_copy())


class GuidanceBackend(StructuredOutputBackend):
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        import llguidance
        import llguidance.hf

        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("structured outputs need a fast (tokenizer.json) tokenizer")
        self._llg = llguidance
        # The logits may be wider than the tokenizer (padded embeddings): those ids are never allowed.
        self.vocab_size = max(int(vocab_size), len(tokenizer))
        eos = sorted(set(eos_token_ids))
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size,
                                                      eos_token=eos or None)
        self.executor = llguidance.LLExecutor()

    def _serialize(self, kind: str, spec: str, options: GrammarOptions) -> str:
        m = self._llg.LLMatcher
        if kind in ("json", "json_object"):
            defaults = {"whitespace_flexible": options.any_whitespace}
            if options.whitespace_pattern is not None:
                defaults["whitespace_pattern"] = options.whitespace_pattern
            return m.grammar_from_json_schema(spec if kind == "json" else '{"type": "object"}',
                                              defaults=defaults)
        if kind == "regex":
            return m.grammar_from_regex(spec)
        if kind == "choice":
            return self._llg.grammar_from("choice", spec)
        if kind == "grammar":
            return self._llg.grammar_from("grammar", spec)  # Lark, or GBNF converted to Lark
        if kind == "structural_tag":
            return m.grammar_from_lark(self._struct_tag_lark(spec))
        raise StructuredOutputError(f"unknown structured outputs kind {kind!r}")

    def _struct_tag_lark(self, spec: str) -> str:
        """vLLM's structural tag: {"structures": [{"begin", "schema", "end"}], "triggers": [...]}:
        free text, where each trigger starts a tagged segment whose body follows the schema."""
        tag = json.loads(spec)
        structures, triggers = tag.get("structures"), tag.get("triggers")
        if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers:
            raise StructuredOutputError("a structural tag needs non-empty 'structures' and 'triggers' lists")
        tags = []
        for s in structures:
            if not isinstance(s, dict) or not isinstance(s.get("begin"), str):
                raise StructuredOutputError("each structural tag structure needs a 'begin' string")
            trigger = next((t for t in triggers if isinstance(t, str) and t and s["begin"].startswith(t)), None)
            if trigger is None:
                raise StructuredOutputError(f"structural tag begin {s['begin']!r} starts with none of the triggers")
            tags.append(self._llg.StructTag(trigger=trigger, begin=s["begin"], grammar=s.get("schema") or {},
                                            end=s.get("end") or ""))
        return self._llg.StructTag.to_grammar(tags)

    def compile(self, kind: str, spec: str, options: GrammarOptions) -> GuidanceCompiled:
        label = _LABELS.get(kind, kind)
        try:
            grammar = self._serialize(kind, spec, options)
        except StructuredOutputError:
            raise
        except (ValueError, TypeError) as e:
            raise StructuredOutputError(f"invalid {label}: {e}"[:_MAX_ERROR_CHARS]) from None
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise StructuredOutputError(f"invalid {label}: {messages[0] if messages else 'rejected'}"
                                        .rstrip()[:_MAX_ERROR_CHARS])
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid {label}: {matcher.get_error()}".rstrip()[:_MAX_ERROR_CHARS])
        return GuidanceCompiled(matcher)

    def fill_bitmask(self, grammars: list[StructuredOutputGrammar], bitmask: torch.Tensor) -> None:
        width = bitmask_width(self.vocab_size)
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous() \
                or tuple(bitmask.shape) != (len(grammars), width):
            raise ValueError(f"bitmask must be a contiguous CPU int32 [{len(grammars)}, {width}] tensor")
        pairs = [(g.matcher, j) for j, g in enumerate(grammars)]
        self.executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), width * 4, len(grammars))
