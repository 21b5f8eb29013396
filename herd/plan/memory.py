"""Per-device memory for a tensor-parallel size: weights, workspace, KV cache, and what fits.

Budget per device = gpu_memory_utilization x HBM (as in vLLM). From it come the weights (this rank's
shards), a workspace allowance (activations of one scheduler step, sampler logits, a runtime
reserve), and what remains is the paged KV cache. RoPE layers attend within a chunk of
attention_chunk_size tokens, so their KV for one sequence never exceeds that many tokens; NoPE
layers keep the whole sequence.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import MappingProxyType

from herd.model.config import Llama4TextConfig
from herd.plan.hardware import GiB, DeviceSpec
from herd.plan.models import ModelSpec
from herd.plan.params import WEIGHT_DTYPES, weight_bytes_per_device

KV_CACHE_DTYPES = MappingProxyType(  # name -> bytes per element
    {"auto": 2, "bf16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_inc": 1})
ACT_BYTES = 2                 # activations are BF16 whatever the weight precision
RUNTIME_RESERVE = 1 * GiB     # driver context, collective buffers, graph pools, allocator slack
UNBOUNDED = sys.maxsize


@dataclass(frozen=True)
class PlanSettings:
    """The serving flags the plan depends on; defaults mirror herd.config's (and vLLM's)."""
    dtype: str = "bf16"
    kv_cache_dtype: str = "auto"
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def validate(self, max_position_embeddings: int) -> None:
        if self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not one of "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0 < self.max_model_len <= max_position_embeddings:
            raise ValueError(f"--max-model-len must be in [1, {max_position_embeddings}] "
                             f"(the model's max_position_embeddings), got {self.max_model_len}")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("--max-num-seqs and --max-num-batched-tokens must be positive")


@dataclass(frozen=True)
class KVCacheLayout:
    """KV cache of one sequence on one rank."""
    bytes_per_token_layer: int   # K and V of this rank's KV heads, one layer, one token
    full_layers: int             # layers that keep every token (NoPE, or no chunking)
    chunked_layers: int          # layers that keep at most chunk_size tokens
    chunk_size: int

    @property
    def bytes_per_token_in_chunk(self) -> int:
        return self.bytes_per_token_layer * (self.full_layers + self.chunked_layers)

    @property
    def bytes_per_token_past_chunk(self) -> int:
        return self.bytes_per_token_layer * self.full_layers

    def bytes_for(self, tokens: int) -> int:
        return self.bytes_per_token_layer * (self.full_layers * tokens
                                             + self.chunked_layers * min(tokens, self.chunk_size))

    def max_tokens(self, budget: int) -> int:
        """Longest sequence whose KV fits in `budget` bytes."""
        if budget <= 0:
            return 0
        first = self.bytes_per_token_in_chunk * self.chunk_size
        if budget < first:
            return budget // self.bytes_per_token_in_chunk
        if self.full_layers == 0:
            return UNBOUNDED
        return self.chunk_size + (budget - first) // self.bytes_per_token_past_chunk


def kv_heads_per_rank(text: Llama4TextConfig, tp: int) -> int:
    return max(1, text.num_key_value_heads // tp)  # beyond num_kv_heads ranks, KV heads replicate


def kv_cache_layout(text: Llama4TextConfig, tp: int, kv_cache_dtype: str) -> KVCacheLayout:
    per_token_layer = 2 * kv_heads_per_rank(text, tp) * text.head_dim * KV_CACHE_DTYPES[kv_cache_dtype]
    L = text.num_hidden_layers
    chunk = text.attention_chunk_size
    chunked = sum(1 for i in range(L) if text.is_rope_layer(i)) if chunk else 0
    return KVCacheLayout(per_token_layer, L - chunked, chunked, int(chunk or 0))


@dataclass(frozen=True)
class Workspace:
    activation_bytes: int  # live activations of one step of max_num_batched_tokens tokens
    logits_bytes: int      # fp32 logits + probabilities for max_num_seqs rows
    reserve_bytes: int

    @property
    def total(self) -> int:
        return self.activation_bytes + self.logits_bytes + self.reserve_bytes


def workspace(text: Llama4TextConfig, tp: int, settings: PlanSettings) -> Workspace:
    """Peak activation estimate: residual, normed input and block output (4 x hidden) plus the
    widest per-rank intermediate (q/k/v + attention output, or gate/up/product of the FFN)."""
    d, kv_rank = text.head_dim, kv_heads_per_rank(text, tp)
    attn = 2 * text.num_attention_heads * d // tp + 2 * kv_rank * d
    L = text.num_hidden_layers
    moe = any(text.is_moe_layer(i) for i in range(L))
    dense = any(not text.is_moe_layer(i) for i in range(L))
    ffn = max(3 * text.intermediate_size * (text.num_experts_per_tok + 1) // tp if moe else 0,
              3 * text.intermediate_size_mlp // tp if dense else 0)
    per_token = ACT_BYTES * (4 * text.hidden_size + max(attn, ffn))
    activations = settings.max_num_batched_tokens * per_token
    logits = settings.max_num_seqs * text.vocab_size * 4 * 2
    return Workspace(activations, logits, RUNTIME_RESERVE)


@dataclass(frozen=True)
class MemoryPlan:
    tp: int
    capacity_bytes: int
    budget_bytes: int             # gpu_memory_utilization x capacity
    weight_bytes: int             # this rank's weights
    workspace: Workspace
    kv: KVCacheLayout
    kv_budget_bytes: int          # budget left for the KV cache (negative: weights do not fit)
    kv_bytes_per_seq: int         # one max_model_len sequence
    max_model_len: int
    max_num_seqs: int
    max_concurrent_seqs: int      # max_model_len sequences the KV budget holds at once
    max_context_len: int          # longest single sequence the KV budget holds
    fits: bool
    reason: str = field(default="")

    @property
    def needed_bytes(self) -> int:
        """Weights + workspace + KV of one max_model_len sequence."""
        return self.weight_bytes + self.workspace.total + self.kv_bytes_per_seq

    @property
    def batch_size(self) -> int:
        """Concurrent max_model_len sequences the scheduler can run (max_num_seqs caps it)."""
        return min(self.max_concurrent_seqs, self.max_num_seqs)


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def check_tp(text: Llama4TextConfig, tp: int) -> None:
    nh, nkv = text.num_attention_heads, text.num_key_value_heads
    ok = (tp >= 1 and nh % tp == 0 and (nkv % tp == 0 or tp % nkv == 0)
          and text.intermediate_size % tp == 0 and text.intermediate_size_mlp % tp == 0)
    if not ok:
        valid = ", ".join(map(str, valid_tp_sizes(text, 64)))
        raise ValueError(f"--tp {tp} does not divide {nh} attention heads / {nkv} KV heads / the MLP "
                         f"widths evenly; valid sizes up to 64: {valid}")


def valid_tp_sizes(text: Llama4TextConfig, limit: int) -> list[int]:
    nh, nkv = text.num_attention_heads, text.num_key_value_heads
    return [t for t in range(1, limit + 1)
            if nh % t == 0 and (nkv % t == 0 or t % nkv == 0)
            and text.intermediate_size % t == 0 and text.intermediate_size_mlp % t == 0]


def plan_memory(model: ModelSpec, device: DeviceSpec, tp: int, settings: PlanSettings) -> MemoryPlan:
    text = model.text
    check_tp(text, tp)
    capacity = device.memory_bytes
    budget = int(settings.gpu_memory_utilization * capacity)
    weights = weight_bytes_per_device(model.groups, settings.dtype, tp)
    ws = workspace(text, tp, settings)
    kv = kv_cache_layout(text, tp, settings.kv_cache_dtype)
    kv_budget = budget - weights - ws.total
    per_seq = kv.bytes_for(settings.max_model_len)
    concurrent = max(0, kv_budget) // per_seq
    context = min(kv.max_tokens(kv_budget), text.max_position_embeddings)
    fits = concurrent >= 1
    if weights > budget:
        reason = f"weights need {gib(weights)} per device, over the {gib(budget)} budget"
    elif kv_budget <= 0:
        reason = f"weights + workspace need {gib(weights + ws.total)}, over the {gib(budget)} budget"
    elif not fits:
        reason = (f"one {settings.max_model_len:,}-token sequence needs {gib(per_seq)} of KV cache, "
                  f"only {gib(kv_budget)} left (longest sequence: {context:,} tokens)")
    else:
        reason = f"{concurrent:,} sequences of {settings.max_model_len:,} tokens fit"
    return MemoryPlan(tp, capacity, budget, weights, ws, kv, kv_budget, per_seq,
                      settings.max_model_len, settings.max_num_seqs, concurrent, context, fits, reason)


@dataclass(frozen=True)
class Recommendation:
    tp: int | None       # smallest TP that fits on one node; None when none does
    reason: str
    plans: list[MemoryPlan]


def recommend_tp(model: ModelSpec, device: DeviceSpec, settings: PlanSettings) -> Recommendation:
    """Try every valid TP size up to one node and pick the smallest that fits."""
    sizes = valid_tp_sizes(model.text, device.cards_per_node)
    plans = [plan_memory(model, device, tp, settings) for tp in sizes]
    u = f"{settings.gpu_memory_utilization:g} x {device.memory_gib:g} GiB"
    for i, p in enumerate(plans):
        if p.fits:
            why = (f"TP={p.tp} is the smallest tensor-parallel size that fits: per device "
                   f"{gib(p.weight_bytes)} weights + {gib(p.workspace.total)} workspace + "
                   f"{gib(p.kv_bytes_per_seq)} KV for one {settings.max_model_len:,}-token sequence "
                   f"<= {u} = {gib(p.budget_bytes)}")
            if i:
                prev = plans[i - 1]
                why += f"; TP={prev.tp} would need {gib(prev.needed_bytes)} per device"
            return Recommendation(p.tp, why, plans)
    last = plans[-1]
    total = sum(g.bytes(settings.dtype) for g in model.groups)
    cards = -(-total // last.budget_bytes)
    why = (f"no TP up to {device.cards_per_node} fits one {device.cards_per_node}-card node: at TP={last.tp} "
           f"each {device.name} needs {gib(last.needed_bytes)} of {u} = {gib(last.budget_bytes)}; "
           f"the {settings.dtype} weights alone ({gib(total)}) need at least {cards} cards' memory")
    if settings.dtype == "bf16":
        why += " (try --dtype fp8)"
    return Recommendation(None, why, plans)
