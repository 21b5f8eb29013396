"""Building blocks: RMSNorm, rotary embedding, and linears that know their TP sharding and quant method.

Weights are [out, in] like nn.Linear. Each linear's `weight_loader(param, loaded, shard_id)` takes a
full (unsharded) checkpoint tensor and copies this rank's slice, so the loader never needs to know
about sharding and no rank holds more than its share once loading is done.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.ops.cpu import cpu_linear_supported
from herd.parallel.context import SINGLE, TPContext


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale (HF Llama 4 order of operations)."""

    def __init__(self, dim: int, eps: float = 1e-5, has_weight: bool = True, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False) if has_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y


# ---------------------------------------------------------------------------------------------
# Rotary embedding (interleaved / complex pairs on the native HF weights)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    orig = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = orig / low, orig / high
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    if high != low:  # with low == high the blend band is empty (and would divide by zero)
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        out = torch.where(band, blended, out)
    return out


class RotaryEmbedding(nn.Module):
    """style "interleaved" rotates pairs (2i, 2i+1) (Llama 4); "neox" rotates (i, i + d/2) (HF Llama 1-3)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, style: str = "interleaved"):
        super().__init__()
        if style not in ("interleaved", "neox"):
            raise ValueError(f"unknown rope style {style!r} (interleaved or neox)")
        self.style = style
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ValueError(f"unsupported rope_scaling type {kind!r} (llama3 or none)")
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, H, d], k: [T, Hkv, d]; pair i rotates by positions * inv_freq[i]."""
        angle = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        rotate = _rotate if self.style == "interleaved" else _rotate_neox
        return rotate(q, cos, sin), rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x0, x1 = xf.chunk(2, dim=-1)
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Linears


class UnquantizedLinearMethod:
    """Plain weights in the model dtype. FP8 methods in herd.quant replace this per layer."""

    def create_weights(self, layer: "LinearBase", dtype: torch.dtype):
        layer.weight = nn.Parameter(torch.empty(layer.out_local, layer.in_local, dtype=dtype),
                                    requires_grad=False)

    def process_weights_after_loading(self, layer: "LinearBase"):
        pass

    def apply(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        if cpu_linear_supported(x, layer.weight):  # decode-sized batch on the CPU (herd.ops.cpu)
            return torch.ops.herd.cpu_linear(x, layer.weight)
        return F.linear(x, layer.weight)


class LinearBase(nn.Module):
    """A linear layer whose arithmetic is delegated to `quant_method`."""

    def __init__(self, in_local: int, out_local: int, dtype: torch.dtype, tp: TPContext,
                 quant_method=None):
        super().__init__()
        self.in_local, self.out_local, self.tp = in_local, out_local, tp
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def extra_repr(self) -> str:
        return f"in={self.in_local}, out={self.out_local}, tp={self.tp.size}"


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features, out_features, dtype, tp: TPContext = SINGLE, quant_method=None):
        super().__init__(in_features, out_features, dtype, tp, quant_method)

    def weight_loader(self, param, loaded, shard_id=None):
        copy_checked(param, loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank's output is a slice."""

    def __init__(self, in_features, out_features, dtype, tp: TPContext = SINGLE, quant_method=None):
        super().__init__(in_features, tp.shard(out_features, "output size"), dtype, tp, quant_method)

    def weight_loader(self, param, loaded, shard_id=None):
        n = param.shape[0]
        copy_checked(param, loaded.narrow(0, self.tp.rank * n, n))


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel outputs stacked in one matrix (gate then up)."""

    def __init__(self, in_features, out_sizes: list[int], dtype, tp: TPContext = SINGLE, quant_method=None):
        self.out_sizes_local = [tp.shard(s, "output size") for s in out_sizes]
        super().__init__(in_features, sum(self.out_sizes_local), dtype, tp, quant_method)

    def weight_loader(self, param, loaded, shard_id: int):
        n = self.out_sizes_local[shard_id]
        off = sum(self.out_sizes_local[:shard_id])
        copy_checked(param.narrow(0, off, n), loaded.narrow(0, self.tp.rank * n, n))


class QKVParallelLinear(LinearBase):
    """q, k, v projections stacked; KV heads are replicated when tp > num_kv_heads."""

    def __init__(self, hidden, head_dim, num_heads, num_kv_heads, dtype, tp: TPContext = SINGLE,
                 quant_method=None):
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        if tp.size >= num_kv_heads:
            if tp.size % num_kv_heads:
                raise ValueError(f"tensor_parallel_size {tp.size} must be a multiple of num_kv_heads {num_kv_heads}")
            self.num_kv_heads, self.kv_replicas = 1, tp.size // num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = tp.shard(num_kv_heads, "num_key_value_heads"), 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden, out, dtype, tp, quant_method)

    def weight_loader(self, param, loaded, shard_id: str):
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            dst, src = param.narrow(0, 0, q), loaded.narrow(0, self.tp.rank * q, q)
        else:
            off = q if shard_id == "k" else q + kv
            kv_rank = self.tp.rank // self.kv_replicas
            dst, src = param.narrow(0, off, kv), loaded.narrow(0, kv_rank * kv, kv)
        copy_checked(dst, src)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with one all-reduce."""

    def __init__(self, in_features, out_features, dtype, tp: TPContext = SINGLE, quant_method=None,
                 reduce_results: bool = True):
        super().__init__(tp.shard(in_features, "input size"), out_features, dtype, tp, quant_method)
        self.reduce_results = reduce_results

    def weight_loader(self, param, loaded, shard_id=None):
        if loaded.dim() < 2 or loaded.shape[1] == 1:  # per-output-channel scale: not split
            copy_checked(param, loaded)
            return
        n = param.shape[1]
        copy_checked(param, loaded.narrow(1, self.tp.rank * n, n))

    def forward(self, x):
        y = self.quant_method.apply(self, x)
        return self.tp.all_reduce(y) if self.reduce_results else y


class VocabParallelEmbedding(nn.Module):
    """Rows split across ranks; each rank embeds the ids it owns and the results are summed."""

    def __init__(self, vocab: int, dim: int, dtype, tp: TPContext = SINGLE):
        super().__init__()
        self.tp = tp
        self.per_rank = math.ceil(vocab / tp.size)
        self.start = tp.rank * self.per_rank
        self.vocab = vocab
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim, dtype=dtype), requires_grad=False)

    def weight_loader(self, param, loaded, shard_id=None):
        n = max(0, min(self.per_rank, self.vocab - self.start))
        param.data.zero_()
        copy_checked(param.narrow(0, 0, n), loaded.narrow(0, self.start, n))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mask[:, None].to(self.weight.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, vocab, dim, dtype, tp: TPContext = SINGLE, quant_method=None):
        super().__init__(vocab, dim, dtype, tp)
        # lm_head stays in high precision under the FP8 recipes; quant_method kept for symmetry.
        self.quant_method = quant_method or UnquantizedLinearMethod()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # through quant_method, so INC MEASURE observes lm_head like any linear
        logits = self.quant_method.apply(self, h)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab]


def copy_checked(dst: torch.Tensor, src: torch.Tensor):
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: parameter slice {tuple(dst.shape)} vs checkpoint {tuple(src.shape)}")
    dst.data.copy_(src.to(dst.dtype))
