"""StructuredOutputManager: compiles constraints (cached), gives each sequence its grammar state, and
computes a step's token bitmasks while the model runs.

The engine calls `prepare_step` right after scheduling: the bitmasks of the constrained sequences
that sample this step are filled in a worker thread (the backend releases the GIL), overlapping the
forward. The sampler takes them (`StructuredOutputRequest.take_bitmask`) just before it samples;
the engine then advances each grammar by the sampled token (`accept`). With no constrained sequence
alive, none of this runs.
"""
from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from herd.engine.sampling_params import SamplingParams, StructuredOutputsParams
from herd.structured_output.backends import (CompiledGrammar, GrammarOptions, StructuredOutputBackend,
                                             StructuredOutputError, StructuredOutputGrammar, make_backend)
from herd.structured_output.backends.abstract import bitmask_width
from herd.structured_output.config import StructuredOutputsConfig, resolve_backend

logger = logging.getLogger(__name__)

# Compiled constraints kept (least recently used dropped first).
GRAMMAR_CACHE_SIZE = 256


class _StepMasks:
    """One step's bitmasks: row j belongs to the j-th constrained sequence."""
    __slots__ = ("bitmask", "future")

    def __init__(self, bitmask: torch.Tensor, future: Future):
        self.bitmask, self.future = bitmask, future


class StructuredOutputRequest:
    """One sequence's grammar state (kept on its SamplingParams.structured_output_request)."""
    __slots__ = ("grammar", "num_accepted", "_backend", "_pending", "__weakref__")

    def __init__(self, grammar: StructuredOutputGrammar, backend: StructuredOutputBackend):
        self.grammar = grammar
        self.num_accepted = 0
        self._backend = backend
        self._pending: tuple[_StepMasks, int, int] | None = None   # (step, row, num_accepted then)

    def take_bitmask(self) -> torch.Tensor:
        """This step's allowed-token bits [bitmask_width] (int32, CPU); waits for prepare_step's
        worker, or computes them now when the step was not prepared (or was, for an earlier state)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[2] == self.num_accepted:
            step, row, _ = pending
            step.future.result()
            return step.bitmask[row]
        bitmask = torch.empty((1, bitmask_width(self._backend.vocab_size)), dtype=torch.int32)
        self._backend.fill_bitmask([self.grammar], bitmask)
        return bitmask[0]

    def accept(self, token: int) -> bool:
        """Advance by the sampled token. True when the sequence must end: the grammar is complete
        (only EOS could follow), or it rejected the token (which the mask should have prevented)."""
        self.num_accepted += 1
        if not self.grammar.accept_token(token):
            logger.error("structured outputs: the grammar rejected sampled token %d; ending the sequence", token)
            return True
        return self.grammar.is_terminated()


# JSON-schema keywords whose values are schemas, maps of schemas, or lists of schemas.
_SCHEMA_KEYS = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
                "additionalProperties", "unevaluatedItems")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems")


def _no_additional_properties(schema):
    """Objects that list properties and say nothing of additionalProperties get `false`, in every
    subschema. An object without properties stays a free-form map."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = _no_additional_properties(out[key])
        elif key == "items" and isinstance(out.get(key), list):
            out[key] = [_no_additional_properties(s) for s in out[key]]
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _no_additional_properties(s) for name, s in out[key].items()}
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [_no_additional_properties(s) for s in out[key]]
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, config: StructuredOutputsConfig | None = None,
                 cache_size: int = GRAMMAR_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.config = config or StructuredOutputsConfig()
        self.cache_size = cache_size
        self._backend: StructuredOutputBackend | None = None
        self._cache: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()      # callers' threads compile while the engine thread runs
        self._pool: ThreadPoolExecutor | None = None
        # Grammar states alive in the engine: empty means steps skip structured outputs entirely.
        self.live: weakref.WeakSet[StructuredOutputRequest] = weakref.WeakSet()

    @property
    def backend(self) -> StructuredOutputBackend:
        """Built on first use (the tokenizer's token trie takes about a second for a 200k vocabulary)."""
        with self._lock:
            if self._backend is None:
                self._backend = make_backend(self.config.backend, self.tokenizer, self.vocab_size,
                                             self.eos_token_ids)
            return self._backend

    # -- compile ----------------------------------------------------------------------------
    def grammar_spec(self, so: StructuredOutputsParams) -> tuple[str, str, GrammarOptions]:
        """(kind, spec text, options): what the backend compiles, and the cache key."""
        kind = so.kind
        compact = so.disable_any_whitespace
        if compact is None:
            compact = self.config.disable_any_whitespace and so.whitespace_pattern is None
        any_ws = not compact
        options = GrammarOptions(any_whitespace=any_ws, whitespace_pattern=so.whitespace_pattern)
        if kind == "json":
            schema = so.json
            strict = so.disable_additional_properties
            if strict is None:
                strict = self.config.disable_additional_properties
            if strict:
                schema = _no_additional_properties(schema)
            return kind, json.dumps(schema, ensure_ascii=False), options
        if kind == "json_object":
            return kind, "", options
        if kind == "choice":
            return kind, json.dumps(so.choice, ensure_ascii=False), GrammarOptions()
        if kind == "structural_tag":
            try:
                json.loads(so.structural_tag)
            except json.JSONDecodeError as e:
                raise StructuredOutputError(f"structured_outputs.structural_tag is not valid JSON: {e}") from None
        return kind, getattr(so, kind), GrammarOptions()

    def compile(self, params: SamplingParams) -> CompiledGrammar | None:
        """The compiled constraint of `params` (None when it has none). Raises StructuredOutputError
        (a ValueError) for a constraint the backend rejects. Thread-safe; results are cached."""
        so = params.structured_outputs
        if so is None:
            return None
        if so.backend is not None:
            try:
                wanted = resolve_backend(so.backend)
            except ValueError as e:
                raise StructuredOutputError(str(e)) from None
            if wanted != self.config.backend:
                raise StructuredOutputError(f"the request asks for structured outputs backend {so.backend!r}, but the "
                                            f"engine runs {self.config.backend!r}; per-request backends are not supported")
        key = self.grammar_spec(so)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        backend = self.backend
        compiled = backend.compile(*key)    # outside the lock: a big schema must not stall the engine
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def new_request(self, compiled: CompiledGrammar) -> StructuredOutputRequest:
        req = StructuredOutputRequest(compiled.new_state(), self.backend)
        self.live.add(req)
        return req

    # -- per step ---------------------------------------------------------------------------
    def prepare_step(self, seqs, num_tokens) -> None:
        """Start filling the bitmasks of the constrained sequences that sample this step (their
        computed tokens reach every known token)."""
        reqs = [seq.params.structured_output_request for seq, n in zip(seqs, num_tokens)
                if seq.params.structured_output_request is not None
                and seq.num_computed_tokens + n >= seq.num_tokens]
        if not reqs:
            return
        backend = self.backend
        bitmask = torch.empty((len(reqs), bitmask_width(backend.vocab_size)), dtype=torch.int32)
        grammars = [r.grammar for r in reqs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="herd-grammar")
        step = _StepMasks(bitmask, self._pool.submit(backend.fill_bitmask, grammars, bitmask))
        for j, r in enumerate(reqs):
            r._pending = (step, j, r.num_accepted)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
