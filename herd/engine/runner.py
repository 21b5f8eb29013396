"""ModelRunner: loads the model, owns the KV cache, turns a scheduled batch into tensors, runs the
model and samples. One runner per tensor-parallel rank."""
from __future__ import annotations

import logging

import torch

from herd.config import EngineConfig
from herd.engine.block_manager import FULL, LOCAL
from herd.engine.sampler import Sampler, SamplingRow, gather_logprobs
from herd.engine.input_batch import InputBatch, StepInputs
from herd.engine.scheduler import ScheduledBatch
from herd.engine.protocol import SchedulerOutput, StepOutput
from herd.model.loader import load_model
from herd.attention.metadata import AttentionMetadata, CommonAttentionMetadata, KVGroupMetadata, group_chunks
from herd.attention.selector import get_attn_backend
from herd.multimodal.inputs import EncoderCache, multimodal_embeddings
from herd.ops.cpu.memory import hugepage_zeros
from herd.parallel.context import SINGLE, TPContext

logger = logging.getLogger(__name__)

KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_inc": torch.float8_e4m3fn}


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPContext = SINGLE, quant=None):
        self.config = config
        self.tp = tp
        self.device = torch.device(config.device if config.device != "cuda" or tp.size == 1
                                   else f"cuda:{tp.rank}")
        mc = config.model
        self.hf_config = mc.hf_config
        self.dtype = mc.torch_dtype
        self.block_size = config.cache.block_size
        self.quant = quant
        self.model = load_model(mc.model, dtype=self.dtype, device=self.device, tp=tp, quant=quant,
                                expert_parallel=config.parallel.enable_expert_parallel, config=mc.hf_config,
                                multimodal=True)
        self.encoder_cache = EncoderCache()  # image features while their prefill is in progress
        self.sampler = Sampler()
        mem = self.weight_memory()
        logger.info("rank %d weights: %.3f GiB on %s (%s)", tp.rank, sum(mem.values()) / 2**30, self.device,
                    ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in sorted(mem.items())))
        self.layer_groups = [layer.self_attn.attn.group for layer in self.model.model.layers]
        self.kv_caches: list | None = None
        self.kv_scales: list | None = None
        self.kv_dtype = KV_DTYPES.get(config.cache.kv_cache_dtype, self.dtype)
        self.attn_backend = get_attn_backend(mc.attention_backend, self.device.type)
        self.group_chunks = group_chunks(self.model)
        # one row more than max_num_seqs: the engine's probe step runs beside a full batch
        self.input_batch = InputBatch(config.scheduler.max_num_seqs + 1, mc.max_model_len, self.block_size,
                                      self.kv_groups())
        self.scratch_block: dict[str, int] = {}
        self.decode_graphs = None   # made once the KV cache exists
        # per InputBatch row, the token this runner sampled last: async scheduling's placeholders
        # are filled from it on the device (no host round trip between two steps)
        self.last_sampled = torch.zeros(len(self.input_batch.num_tokens), dtype=torch.long, device=self.device)

    def weight_memory(self) -> dict[str, int]:
        """Bytes of this rank's parameters and buffers by dtype (FP8 weights stay FP8 on the device)."""
        out: dict[str, int] = {}
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            key = str(t.dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
        return out

    # -- KV cache ---------------------------------------------------------------------------
    def kv_groups(self) -> list[str]:
        return [g for g in (FULL, LOCAL) if g in self.layer_groups]

    def block_bytes(self, group: str) -> int:
        attn = self.model.model.layers[0].self_attn.attn
        per_layer = 2 * self.block_size * attn.num_kv_heads * attn.head_dim * self.kv_dtype.itemsize
        return per_layer * self.layer_groups.count(group)

    def determine_num_blocks(self) -> dict[str, int]:
        cache = self.config.cache
        groups = self.kv_groups()
        if cache.num_kv_blocks is not None:
            return {g: cache.num_kv_blocks for g in groups}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            # leave room for activations of one full step
            act = 4 * self.config.scheduler.max_num_batched_tokens * self.hf_config.hidden_size * 4
            budget = int(total * cache.gpu_memory_utilization) - used - act
        else:
            budget = int(cache.cpu_kv_cache_space_gib * (1 << 30))
        # Split the budget so both groups run out together for sequences of max_model_len.
        L = self.config.model.max_model_len
        per_seq = {g: self._blocks_for(g, L) for g in groups}
        seq_bytes = sum(per_seq[g] * self.block_bytes(g) for g in groups)
        n_seqs = max(budget, 0) / seq_bytes
        if n_seqs < 1:
            raise ValueError(f"not enough memory for the KV cache of one sequence of max_model_len={L} "
                             f"({seq_bytes / 2**20:.1f} MiB needed, {budget / 2**20:.1f} MiB available); "
                             "lower max_model_len or raise gpu_memory_utilization")
        return {g: max(per_seq[g], int(n_seqs * per_seq[g])) for g in groups}

    def _blocks_for(self, group: str, num_tokens: int) -> int:
        n = -(-num_tokens // self.block_size)
        if group == LOCAL:
            n = min(n, -(-self.hf_config.attention_chunk_size // self.block_size) + 1)
        return n

    def _zeros(self, shape) -> torch.Tensor:
        """A KV cache: on the CPU on 2 MiB pages (decode attention streams it, as it does the weights)."""
        if self.device.type == "cpu":
            return hugepage_zeros(shape, self.kv_dtype)
        return torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    def allocate_kv_cache(self, num_blocks: dict[str, int]):
        attn0 = self.model.model.layers[0].self_attn.attn
        shape = (self.block_size, attn0.num_kv_heads, attn0.head_dim)
        self.kv_caches = []
        # One block past the pool per group: padding rows of captured decode steps write there.
        self.scratch_block = dict(num_blocks)
        for g in self.layer_groups:
            n = num_blocks[g] + 1
            self.kv_caches.append((self._zeros((n, *shape)), self._zeros((n, *shape))))
        if self.kv_scales is None:
            measured = getattr(self.quant, "kv_scales", None) or {}
            if self.config.cache.kv_cache_dtype == "fp8_inc" and not measured:
                raise ValueError("--kv-cache-dtype fp8_inc needs --quantization inc with KV-cache measurements "
                                 "(k_cache/v_cache nodes) in QUANT_CONFIG's measurement files")
            self.kv_scales = [measured.get(i, (1.0, 1.0)) for i in range(len(self.layer_groups))]
        self.decode_graphs = self._make_decode_graphs()

    def _make_decode_graphs(self):
        """enforce_eager=False: CUDA graphs on CUDA when the backend allows; on the CPU only when a
        compilation level >= 1 asks for torch.compile (its compile time is paid on first use)."""
        from herd.engine.decode_graphs import DecodeGraphRunner
        mc = self.config.model
        cc = mc.compilation_config
        if mc.enforce_eager or self.tp.size > 1 or self.quant_needs_eager():
            return None
        sizes = cc.capture_sizes(self.config.scheduler.max_num_seqs, self.device.type)
        if self.device.type == "cuda":
            if cc.level == 0 or not self.attn_backend.supports_cuda_graphs:
                return None
            if self.hf_config.moe_layers and self.dtype != torch.bfloat16:
                # the grouped expert GEMM is bf16-only on CUDA; other dtypes loop over experts on the host
                logger.info("decode CUDA graphs need bfloat16 for MoE layers; running eagerly")
                return None
            return DecodeGraphRunner(self, sizes, "cuda")
        if cc.level is None or cc.level < 1:
            return None
        if not self.attn_backend.supports_graphs:
            raise ValueError(f"attention backend {self.attn_backend.name!r} cannot be compiled; use sdpa or "
                             "triton, or --enforce-eager")
        options = cc.inductor_options(self.device.type) if cc.backend == "inductor" else None
        return DecodeGraphRunner(self, sizes, "compile", cc.backend, options)

    def quant_needs_eager(self) -> bool:
        """INC MEASURE observes activations with host-side statistics in the forward."""
        from herd.quant.methods.inc import IncMeasureMethods
        return isinstance(self.quant, IncMeasureMethods)

    def finish(self):
        """Shutdown work: INC MEASURE writes its measurement files."""
        return self.quant.finish() if self.quant is not None else []

    # -- one step ---------------------------------------------------------------------------
    def build_metadata(self, si: StepInputs) -> AttentionMetadata:
        """Host arrays -> device tensors, once per step; the backend plans its work per KV group."""
        dev = self.device
        groups = {g: KVGroupMetadata(torch.from_numpy(si.block_tables[g]).to(dev),
                                     torch.from_numpy(si.slot_mapping[g]).to(dev)) for g in self.kv_groups()}
        qlens = si.num_scheduled
        common = CommonAttentionMetadata(
            torch.from_numpy(si.query_start_loc).to(dev), torch.from_numpy(si.seq_lens).to(dev), groups,
            si.query_start_loc, si.seq_lens, si.num_decodes, int(qlens.max(initial=0)),
            int(si.seq_lens.max(initial=0)), self.block_size)
        return AttentionMetadata(self.attn_backend, common, self.attn_backend.build(common, self.group_chunks),
                                 self.kv_caches, self.kv_scales)

    def fill_placeholders(self, input_ids: torch.Tensor, si: StepInputs) -> None:
        """Put each placeholder's value, the row's last sample, into the step's device input ids."""
        if len(si.placeholder_idx):
            idx = torch.from_numpy(si.placeholder_idx).to(self.device)
            rows = torch.from_numpy(si.placeholder_rows).to(self.device)
            input_ids[idx] = self.last_sampled[rows]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, eos_ids: set[int] | None = None) -> StepOutput:
        return self.execute_model(batch.output, batch, eos_ids)

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput, batch: ScheduledBatch | None = None,
                      eos_ids: set[int] | None = None) -> StepOutput | None:
        """Apply the step's diffs, then forward and logits. The driver passes the live `batch`
        (sampling state) and samples; other tensor-parallel ranks pass None and run the same
        collectives (the lm_head gathers included), returning None."""
        ib = self.input_batch
        ib.update(sched)
        si = ib.prepare(sched)
        if batch is None and len(si.placeholder_idx):
            raise RuntimeError("async scheduling needs the sampled tokens, which only the driver rank has")
        order = sched.order[si.perm]
        hidden = None
        if self.decode_graphs is not None and self.decode_graphs.can_run(si, bool(sched.mm)):
            hidden = self.decode_graphs.run(si)
        if hidden is None:
            meta = self.build_metadata(si)
            input_ids = torch.from_numpy(si.input_ids).to(self.device)
            self.fill_placeholders(input_ids, si)
            positions = torch.from_numpy(si.positions).to(self.device)
            mm = [sched.mm.get(int(sid)) for sid in order] if sched.mm else [None] * len(order)
            embeds = multimodal_embeddings(self.model, input_ids, mm, si.query_start_loc[:-1].tolist(),
                                           self.encoder_cache)
            hidden = self.model(input_ids, positions, meta, inputs_embeds=embeds)
        # Rows that need logits: the last token of each sequence that completes its known tokens
        # (it samples), plus prompt positions whose logprobs were asked for.
        sample_rows = si.query_start_loc[1:][si.sample_idx] - 1
        if batch is None:
            if len(sample_rows):
                self.model.compute_logits(hidden[torch.from_numpy(sample_rows).to(self.device)])
            for _, q, count, _ in si.prompt_logprob_rows:
                self.model.compute_logits(hidden[q:q + count])
            return None
        B = len(order)
        sampled: list[int | None] = [None] * B
        logprobs: list = [None] * B
        prompt_lps: list = [None] * B
        perm = si.perm.tolist()
        if len(sample_rows):
            logits = self.model.compute_logits(hidden[torch.from_numpy(sample_rows).to(self.device)]).float()
            picked = [perm[i] for i in si.sample_idx.tolist()]
            counts = batch.num_output_tokens  # placeholders included: min_tokens counts them
            rows = [SamplingRow(params=s.params, prompt_token_ids=s.prompt_token_ids,
                                output_token_ids=s.output_token_ids, generator=s.generator,
                                eos_token_ids=eos_ids or set(),
                                num_output_tokens=counts[j] if counts is not None else None)
                    for j, s in ((j, batch.seqs[j]) for j in picked)]
            out = self.sampler(logits, rows)
            # kept on the device for the next step's placeholders
            self.last_sampled[torch.from_numpy(si.rows[si.sample_idx]).to(self.device)] = out.sampled
            for j, i in enumerate(si.sample_idx.tolist()):
                sampled[perm[i]] = out.sampled_token_ids[j]
                if out.logprobs is not None:
                    logprobs[perm[i]] = out.logprobs[j]
        for i, q, count, start in si.prompt_logprob_rows:
            seq = batch.seqs[perm[i]]
            lp = torch.log_softmax(self.model.compute_logits(hidden[q:q + count]).float(), dim=-1)
            targets = torch.tensor(seq.prompt_token_ids[start + 1:start + 1 + count], device=lp.device)
            n = seq.params.num_prompt_logprobs(lp.shape[-1])
            prompt_lps[perm[i]] = gather_logprobs(lp, targets, [n] * count)
        return StepOutput(sampled, logprobs, prompt_lps)
