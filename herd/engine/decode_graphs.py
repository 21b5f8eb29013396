"""Captured decode steps: a decode-only batch is padded to the next capture size and run through
a graph made once per size (vLLM's enforce_eager=False).

  cuda     CUDA graphs over static input buffers (the attention backend must read only device
           tensors in a decode step: triton), captured the first time each size is needed
  compile  torch.compile of the model forward (CPU, -O / --compilation-config level >= 1)

Padding rows decode token 0 at position 0 into the runner's scratch KV block; their outputs are
dropped. Sequences' real rows are computed exactly as in eager mode."""
from __future__ import annotations

import bisect
import contextlib
import logging

import numpy as np
import torch

from herd.attention.metadata import AttentionMetadata, CommonAttentionMetadata, KVGroupMetadata, next_pow2
from herd.engine.input_batch import StepInputs

logger = logging.getLogger(__name__)


def _mark_window_dynamic(meta: AttentionMetadata) -> None:
    """The KV window (block-table width, power-of-two buckets) grows as sequences do: compile it
    as a symbolic size from the start, so each batch size compiles once rather than once per
    width and again when dynamo would turn the width dynamic by itself."""
    for g in meta.common.groups.values():
        torch._dynamo.maybe_mark_dynamic(g.block_tables, 1)
    for plan in meta.per_group.values():
        meta.impl.mark_window_dynamic(plan)


def _skip_guards():
    """Dynamo's current stance (a test's fail_on_recompile stays in force), checking only the
    guards that tell cached graphs apart."""
    from torch._dynamo import eval_frame
    cur = eval_frame._stance
    return torch.compiler.set_stance(cur.stance, skip_guard_eval_unsafe=True, force_backend=cur.backend)


class DecodeGraphRunner:
    def __init__(self, runner, sizes: list[int], mode: str, compile_backend: str = "inductor",
                 compile_options: dict | None = None):
        self.runner, self.sizes, self.mode = runner, sorted(sizes), mode
        self.max_size = self.sizes[-1]
        self.max_blocks = -(-runner.config.model.max_model_len // runner.block_size)
        self.graphs: dict[int, tuple] = {}
        self.pool = None
        self.disabled = False
        self.compiled_sizes: set[int] = set()
        if mode == "compile":
            self.compiled = torch.compile(runner.model.forward, fullgraph=True, backend=compile_backend)
            # Set around each call, not passed as torch.compile(options=...): freezing is also read
            # before inductor's compile (which only sees the options), and without it there the
            # weights stay graph inputs and the GEMM template does not apply.
            self.compile_options = dict(compile_options or {})
            import torch._dynamo.config as dynamo_config
            import torch._inductor.config as inductor_config
            self.inductor_config, self.dynamo_config = inductor_config, dynamo_config
            # One graph per capture size (batch sizes static: dynamo would otherwise turn the batch
            # dynamic at the second size); dynamo's cache is per code object, shared with every
            # other engine of the process, hence room above its default limit of 8.
            self.dynamo_options = {"automatic_dynamic_shapes": False,
                                   "recompile_limit": max(dynamo_config.recompile_limit, 2 * len(self.sizes) + 8)}
        elif mode == "cuda":
            dev, R = runner.device, self.max_size
            self.buf = {"input_ids": torch.zeros(R, dtype=torch.long, device=dev),
                        "positions": torch.zeros(R, dtype=torch.long, device=dev),
                        "seq_lens": torch.ones(R, dtype=torch.int32, device=dev),
                        "query_start_loc": torch.arange(R + 1, dtype=torch.int32, device=dev)}
            self.tables = {g: torch.full((R, self.max_blocks), -1, dtype=torch.int32, device=dev)
                           for g in runner.kv_groups()}
            self.slots = {g: torch.zeros(R, dtype=torch.long, device=dev) for g in runner.kv_groups()}
        else:
            raise ValueError(f"unknown decode graph mode {mode!r}")

    def can_run(self, si: StepInputs, has_mm: bool) -> bool:
        B = len(si.rows)
        return not self.disabled and 0 < B <= self.max_size and si.num_decodes == B and not has_mm

    def _padded(self, si: StepInputs, Bp: int, width: int):
        """Host arrays of the padded batch."""
        B, r = len(si.rows), self.runner
        ids = np.zeros(Bp, dtype=np.int64)
        ids[:B] = si.input_ids
        pos = np.zeros(Bp, dtype=np.int64)
        pos[:B] = si.positions
        seq_lens = np.ones(Bp, dtype=np.int32)
        seq_lens[:B] = si.seq_lens
        tables, slots = {}, {}
        for g in r.kv_groups():
            t = np.full((Bp, width), -1, dtype=np.int32)
            w = min(si.block_tables[g].shape[1], width)
            t[:B, :w] = si.block_tables[g][:, :w]
            t[B:, 0] = r.scratch_block[g]
            tables[g] = t
            s = np.full(Bp, r.scratch_block[g] * r.block_size, dtype=np.int64)
            s[:B] = si.slot_mapping[g]
            slots[g] = s
        return ids, pos, seq_lens, tables, slots

    def run(self, si: StepInputs) -> torch.Tensor | None:
        """The step's hidden states, or None when it must run eagerly after all."""
        B = len(si.rows)
        Bp = self.sizes[bisect.bisect_left(self.sizes, B)]
        if self.mode == "compile":
            return self._run_compiled(si, B, Bp)
        return self._run_cuda(si, B, Bp)

    def _metadata(self, qsl, seq_lens, tables, slots, seq_lens_cpu, Bp) -> AttentionMetadata:
        r = self.runner
        groups = {g: KVGroupMetadata(tables[g], slots[g]) for g in tables}
        common = CommonAttentionMetadata(qsl, seq_lens, groups, np.arange(Bp + 1, dtype=np.int32), seq_lens_cpu,
                                         Bp, 1, int(seq_lens_cpu.max()), r.block_size)
        return AttentionMetadata(r.attn_backend, common, r.attn_backend.build(common, r.group_chunks, for_graph=True),
                                 r.kv_caches, r.kv_scales)

    def _run_compiled(self, si, B, Bp):
        r, dev = self.runner, self.runner.device
        width = min(next_pow2(max(t.shape[1] for t in si.block_tables.values())), self.max_blocks)
        ids, pos, seq_lens, tables, slots = self._padded(si, Bp, width)
        t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
        meta = self._metadata(t(np.arange(Bp + 1, dtype=np.int32)), t(seq_lens),
                              {g: t(v) for g, v in tables.items()}, {g: t(v) for g, v in slots.items()}, seq_lens, Bp)
        ids = t(ids)
        r.fill_placeholders(ids, si)  # async scheduling: last samples, on the device
        _mark_window_dynamic(meta)
        # A size's first call checks every guard (and compiles); later ones check only the guards
        # that tell the cached graphs apart (input shapes, and whatever failed before: another
        # engine's model): the full check walks every module and costs ~1 ms at batch 1.
        skip = _skip_guards() if Bp in self.compiled_sizes else contextlib.nullcontext()
        with self.dynamo_config.patch(self.dynamo_options), self.inductor_config.patch(self.compile_options), skip:
            out = self.compiled(ids, t(pos), meta)[:B]
        self.compiled_sizes.add(Bp)
        return out

    def _run_cuda(self, si, B, Bp):
        ids, pos, seq_lens, tables, slots = self._padded(si, Bp, self.max_blocks)
        b = self.buf
        b["input_ids"][:Bp].copy_(torch.from_numpy(ids), non_blocking=True)
        self.runner.fill_placeholders(b["input_ids"], si)  # async scheduling: last samples, on the device
        b["positions"][:Bp].copy_(torch.from_numpy(pos), non_blocking=True)
        b["seq_lens"][:Bp].copy_(torch.from_numpy(seq_lens), non_blocking=True)
        for g in tables:
            self.tables[g][:Bp].copy_(torch.from_numpy(tables[g]), non_blocking=True)
            self.slots[g][:Bp].copy_(torch.from_numpy(slots[g]), non_blocking=True)
        entry = self.graphs.get(Bp)
        if entry is None:
            try:
                entry = self._capture(Bp)
            except Exception as e:  # noqa: BLE001 - a forward that cannot be recorded runs eagerly
                logger.warning("CUDA graph capture failed (%s: %s); decoding eagerly from now on",
                               type(e).__name__, e)
                torch.cuda.synchronize(self.runner.device)
                self.disabled = True
                return None
        graph, out = entry
        graph.replay()
        return out[:B]

    def _capture(self, Bp):
        """Warm up eagerly on the current (real) inputs, then record. Recording runs nothing, so
        the replay that follows computes this step."""
        r, b = self.runner, self.buf
        # The plan is built from the capture-time host values and reused by every replay: for_graph
        # makes it depend only on Bp.
        seq_cpu = np.full(Bp, self.max_blocks * r.block_size, dtype=np.int32)
        meta = self._metadata(b["query_start_loc"][:Bp + 1], b["seq_lens"][:Bp],
                              {g: t[:Bp] for g, t in self.tables.items()}, {g: s[:Bp] for g, s in self.slots.items()},
                              seq_cpu, Bp)
        args = (b["input_ids"][:Bp], b["positions"][:Bp], meta)
        stream = torch.cuda.Stream(device=r.device)
        stream.wait_stream(torch.cuda.current_stream(r.device))
        with torch.cuda.stream(stream):
            r.model(*args)
        torch.cuda.current_stream(r.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = r.model(*args)
        logger.info("captured a CUDA graph for decode batches of %d", Bp)
        self.graphs[Bp] = (graph, out)
        return graph, out
