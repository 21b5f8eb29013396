"""ModelRunner: loads the model, owns the KV cache, turns a scheduled batch into tensors, runs the
model and samples. One runner per tensor-parallel rank."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from herd.config import EngineConfig
from herd.engine.block_manager import FULL, LOCAL
from herd.engine.outputs import Logprob
from herd.engine.sampler import Sampler, SamplingRow, gather_logprobs
from herd.engine.scheduler import ScheduledBatch
from herd.model.loader import load_model
from herd.multimodal.inputs import EncoderCache, MultiModalSlice, multimodal_embeddings
from herd.ops.attention import AttentionMetadata, KVGroupMetadata
from herd.parallel.context import SINGLE, TPContext

logger = logging.getLogger(__name__)

KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_inc": torch.float8_e4m3fn}


@dataclass
class StepOutput:
    """Per scheduled sequence: the sampled token (None for an unfinished prefill chunk), its logprobs,
    and the prompt logprobs of the positions this step covered."""
    sampled: list[int | None]
    logprobs: list[dict[int, Logprob] | None]
    prompt_logprobs: list[list[dict[int, Logprob]] | None]


@dataclass
class SeqInput:
    """One sequence's share of a step, as every tensor-parallel rank needs it (compact, picklable)."""
    token_ids: list[int]                  # the tokens computed this step
    start: int                            # position of token_ids[0]
    block_tables: dict[str, list[int]]    # KV group -> block ids
    num_tokens: int                       # tokens known so far (prompt + output)
    num_prompt_tokens: int
    prompt_logprobs: bool                 # prompt positions need logits
    mm: list[MultiModalSlice] | None = None  # image feature rows this step writes (prefill chunks)


def model_input(batch: ScheduledBatch) -> list[SeqInput]:
    out = []
    for seq, n in zip(batch.seqs, batch.num_tokens):
        start = seq.num_computed_tokens
        out.append(SeqInput(seq.all_token_ids[start:start + n], start,
                            {g: list(t) for g, t in seq.block_tables.items()}, seq.num_tokens,
                            seq.num_prompt_tokens, seq.params.prompt_logprobs is not None,
                            seq.multi_modal.slices(start, n) if seq.multi_modal is not None else None))
    return out


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

    def allocate_kv_cache(self, num_blocks: dict[str, int]):
        attn0 = self.model.model.layers[0].self_attn.attn
        shape = (self.block_size, attn0.num_kv_heads, attn0.head_dim)
        self.kv_caches = []
        for g in self.layer_groups:
            n = num_blocks[g]
            self.kv_caches.append((torch.zeros((n, *shape), dtype=self.kv_dtype, device=self.device),
                                   torch.zeros((n, *shape), dtype=self.kv_dtype, device=self.device)))
        if self.kv_scales is None:
            measured = getattr(self.quant, "kv_scales", None) or {}
            if self.config.cache.kv_cache_dtype == "fp8_inc" and not measured:
                raise ValueError("--kv-cache-dtype fp8_inc needs --quantization inc with KV-cache measurements "
                                 "(k_cache/v_cache nodes) in QUANT_CONFIG's measurement files")
            self.kv_scales = [measured.get(i, (1.0, 1.0)) for i in range(len(self.layer_groups))]

    def finish(self):
        """Shutdown work: INC MEASURE writes its measurement files."""
        return self.quant.finish() if self.quant is not None else []

    # -- one step ---------------------------------------------------------------------------
    def prepare(self, inp: list[SeqInput]):
        bs = self.block_size
        ids, pos, qsl, seq_lens = [], [], [0], []
        slots = {g: [] for g in self.kv_groups()}
        for s in inp:
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            positions = range(s.start, s.start + n)
            pos.extend(positions)
            qsl.append(qsl[-1] + n)
            seq_lens.append(s.start + n)
            for g in slots:
                table = s.block_tables[g]
                slots[g].extend(table[p // bs] * bs + p % bs for p in positions)
        groups = {}
        for g in slots:
            width = max(len(s.block_tables[g]) for s in inp)
            tables = [s.block_tables[g] + [-1] * (width - len(s.block_tables[g])) for s in inp]
            groups[g] = KVGroupMetadata(torch.tensor(tables, dtype=torch.long, device=self.device),
                                        torch.tensor(slots[g], dtype=torch.long, device=self.device))
        meta = AttentionMetadata(query_start_loc=qsl, seq_lens=seq_lens, groups=groups,
                                 kv_caches=self.kv_caches, block_size=bs, kv_scales=self.kv_scales)
        return (torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(pos, dtype=torch.long, device=self.device), meta)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, eos_ids: set[int] | None = None) -> StepOutput:
        return self.execute_model(model_input(batch), batch, eos_ids)

    @torch.inference_mode()
    def execute_model(self, inp: list[SeqInput], batch: ScheduledBatch | None = None,
                      eos_ids: set[int] | None = None) -> StepOutput | None:
        """Forward and logits for `inp`. The driver passes the live `batch` (sampling state) and
        samples; other tensor-parallel ranks pass None and run the same collectives (the lm_head
        gathers included), returning None."""
        input_ids, positions, meta = self.prepare(inp)
        embeds = multimodal_embeddings(self.model, input_ids, [s.mm for s in inp], meta.query_start_loc,
                                       self.encoder_cache)
        hidden = self.model(input_ids, positions, meta, inputs_embeds=embeds)
        # Which rows need logits: the last token of each sequence that completes its known tokens
        # (it samples), plus prompt positions whose logprobs were asked for.
        sample_rows, sample_seqs, prompt_rows = [], [], []
        for i, s in enumerate(inp):
            q, n, start = meta.query_start_loc[i], len(s.token_ids), s.start
            if s.prompt_logprobs and start < s.num_prompt_tokens - 1:
                end = min(start + n, s.num_prompt_tokens - 1)
                prompt_rows.append((i, list(range(q, q + end - start)), start))
            if start + n == s.num_tokens:
                sample_rows.append(q + n - 1)
                sample_seqs.append(i)
        if batch is None:
            if sample_rows:
                self.model.compute_logits(hidden[sample_rows])
            for _, rows_idx, _ in prompt_rows:
                self.model.compute_logits(hidden[rows_idx])
            return None
        sampled: list[int | None] = [None] * len(inp)
        logprobs: list = [None] * len(inp)
        prompt_lps: list = [None] * len(inp)
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows]).float()
            rows = [SamplingRow(params=batch.seqs[i].params,
                                prompt_token_ids=batch.seqs[i].prompt_token_ids,
                                output_token_ids=batch.seqs[i].output_token_ids,
                                generator=batch.seqs[i].generator,
                                eos_token_ids=eos_ids or set()) for i in sample_seqs]
            out = self.sampler(logits, rows)
            for j, i in enumerate(sample_seqs):
                sampled[i] = out.sampled_token_ids[j]
                if out.logprobs is not None:
                    logprobs[i] = out.logprobs[j]
        for i, rows_idx, start in prompt_rows:
            seq = batch.seqs[i]
            lp = torch.log_softmax(self.model.compute_logits(hidden[rows_idx]).float(), dim=-1)
            targets = torch.tensor(seq.prompt_token_ids[start + 1:start + 1 + len(rows_idx)], device=lp.device)
            n = seq.params.num_prompt_logprobs(lp.shape[-1])
            prompt_lps[i] = gather_logprobs(lp, targets, [n] * len(rows_idx))
        return StepOutput(sampled, logprobs, prompt_lps)
