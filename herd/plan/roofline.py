"""Roofline speed limits: decode from HBM bandwidth, prefill from peak FLOP/s.

A step takes max(bytes read / bandwidth, FLOPs / peak) on each rank. It ignores communication,
kernel launches and scheduling, so the figures are upper bounds on speed, not predictions.
"""
from __future__ import annotations

from dataclasses import dataclass

from herd.plan.hardware import DeviceSpec
from herd.plan.memory import KVCacheLayout
from herd.plan.models import ModelSpec
from herd.plan.params import bytes_read_per_device


@dataclass(frozen=True)
class StepCost:
    bytes: float        # HBM bytes one rank reads (weights + KV cache)
    time_memory_s: float
    time_compute_s: float

    @property
    def time_s(self) -> float:
        return max(self.time_memory_s, self.time_compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.time_memory_s >= self.time_compute_s else "compute"


@dataclass(frozen=True)
class DecodeEstimate:
    batch_size: int
    context_len: int
    step: StepCost

    @property
    def tokens_per_s_per_seq(self) -> float:
        return 1.0 / self.step.time_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size / self.step.time_s


@dataclass(frozen=True)
class PrefillEstimate:
    prompt_len: int
    chunk_tokens: int
    time_s: float
    bound: str          # what bounds most of the time

    @property
    def tokens_per_s(self) -> float:
        return self.prompt_len / self.time_s


def linear_seconds_per_token(model: ModelSpec, device: DeviceSpec, dtype: str, tp: int) -> float:
    """Matmul time of one token's active weights on one rank (2 FLOPs per weight).

    FP8 linears run at the FP8 peak; BF16 ones and INT4 (dequantized to BF16) at the BF16 peak.
    The embedding is a lookup and the vision tower does not run for text tokens."""
    seconds = 0.0
    for g in model.groups:
        if g.category in ("embedding", "vision", "projector"):
            continue
        fp8 = dtype == "fp8" and g.quantized(dtype)
        seconds += 2 * g.active_numel / g.shards(tp) / device.peak_flops(fp8)
    return seconds


def _keys_chunked(n: int, chunk: int) -> int:
    """Sum over positions p < n of the keys a chunked-attention query sees, (p mod chunk) + 1."""
    full, rest = divmod(n, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def attention_flops(model: ModelSpec, kv: KVCacheLayout, tp: int, start: int, end: int) -> float:
    """QK^T and PV FLOPs on one rank for query positions [start, end) of one sequence."""
    t = model.text
    per_key = 4 * t.num_attention_heads * t.head_dim / tp
    full = end * (end + 1) // 2 - start * (start + 1) // 2
    chunked = (_keys_chunked(end, kv.chunk_size) - _keys_chunked(start, kv.chunk_size)
               if kv.chunked_layers else 0)
    return per_key * (kv.full_layers * full + kv.chunked_layers * chunked)


def decode_estimate(model: ModelSpec, device: DeviceSpec, dtype: str, tp: int, kv: KVCacheLayout,
                    batch_size: int, context_len: int) -> DecodeEstimate:
    """One decode step for `batch_size` sequences, each holding `context_len` tokens of KV."""
    t = model.text
    weights = bytes_read_per_device(model.groups, dtype, tp, batch_size,
                                    t.num_local_experts, t.num_experts_per_tok)
    kv_bytes = batch_size * kv.bytes_for(context_len)
    linear = batch_size * linear_seconds_per_token(model, device, dtype, tp)
    # the newest token's query sees every key on full layers and up to a chunk on chunked ones
    keys = kv.full_layers * context_len + kv.chunked_layers * min(context_len, kv.chunk_size)
    attn = batch_size * 4 * t.num_attention_heads * t.head_dim / tp * keys
    step = StepCost(weights + kv_bytes, (weights + kv_bytes) / device.bandwidth,
                    linear + attn / device.peak_flops(False))
    return DecodeEstimate(batch_size, context_len, step)


def prefill_estimate(model: ModelSpec, device: DeviceSpec, dtype: str, tp: int, kv: KVCacheLayout,
                     prompt_len: int, chunk_tokens: int) -> PrefillEstimate:
    """One prompt alone, prefilled in chunks of `chunk_tokens` (max_num_batched_tokens)."""
    t = model.text
    per_token = linear_seconds_per_token(model, device, dtype, tp)
    total, compute_time = 0.0, 0.0
    for start in range(0, prompt_len, chunk_tokens):
        end = min(prompt_len, start + chunk_tokens)
        weights = bytes_read_per_device(model.groups, dtype, tp, end - start,
                                        t.num_local_experts, t.num_experts_per_tok)
        mem = (weights + kv.bytes_for(end)) / device.bandwidth
        compute = ((end - start) * per_token
                   + attention_flops(model, kv, tp, start, end) / device.peak_flops(False))
        total += max(mem, compute)
        compute_time += compute if compute >= mem else 0.0
    bound = "compute" if compute_time * 2 >= total else "memory"
    return PrefillEstimate(prompt_len, chunk_tokens, total, bound)
