"""Grouped expert GEMMs.

fused_moe_ref: the readable reference; sort (token, expert) pairs by expert, one GEMM pair per
expert in a Python loop (host syncs, index_add_).
fused_moe: the fast path; routing, permutation and unpermutation on the device and one grouped
GEMM per projection for all experts (grouped_gemm: torch._grouped_mm, herd's CPU kernel, or on
CUDA at decode sizes herd's Triton kernel); falls back to the reference when no kernel can take
the shapes or dtype.

Weights: w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]. Llama 4 applies the router weight
to the expert *input* (before the SwiGLU), so it cannot be folded into the output.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.nn.functional as F

from herd.ops.cpu import cpu_grouped_gemm_supported


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, apply_router_weight_on_input: bool = True,
                  expert_map: torch.Tensor | None = None, linear=None) -> torch.Tensor:
    """x [T, D]; topk_ids/topk_weights [T, k]. expert_map maps global expert id -> local index or -1
    (expert parallelism: experts owned by other ranks contribute nothing here).
    `linear(x, e, which)` overrides the per-expert GEMM (quantized weights)."""
    T, k = topk_ids.shape
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1)
    if expert_map is not None:
        flat_ids = expert_map[flat_ids]
    token_idx = torch.arange(T, device=x.device).repeat_interleave(k)
    weights = topk_weights.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    counts = torch.bincount(sorted_ids[sorted_ids >= 0], minlength=w13.shape[0]).tolist()
    start = int((sorted_ids < 0).sum())
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok = token_idx[sel]
        xin = x[tok]
        w = weights[sel].to(x.dtype)[:, None]
        if apply_router_weight_on_input:
            xin = xin * w
        if linear is None:
            h = silu_and_mul(F.linear(xin, w13[e]))
            y = F.linear(h, w2[e])
        else:
            y = linear(silu_and_mul(linear(xin, e, "w13")), e, "w2")
        if not apply_router_weight_on_input:
            y = y * w
        out.index_add_(0, tok, y)
    return out


# ---------------------------------------------------------------------------------------------
# Fast path: routing on the device and one grouped GEMM per projection.
#
# Nothing below reads a tensor value on the host (no .tolist() / .item() / int(t) / bool(t)) and
# every shape depends only on the input shapes, so it traces under torch.compile(fullgraph=True)
# and can be captured in a CUDA graph. Pairs (token, k) are sorted by local expert; pairs routed to
# experts of other EP ranks get the sentinel expert E and sort after all local ones, past offs[-1].
# torch._grouped_mm leaves the output rows past offs[-1] uninitialized (arbitrary values, inf/NaN
# included), so those rows are replaced with torch.where, never multiplied by zero.


class MoeRouting(NamedTuple):
    """(token, k) pairs sorted by local expert. M = T * k sorted rows."""
    token: torch.Tensor    # [M] token index of each sorted row
    expert: torch.Tensor   # [M] local expert of each sorted row; E for pairs owned by other ranks
    valid: torch.Tensor    # [M] bool, the row's expert is local
    offs: torch.Tensor     # [E] int32 end offset of each expert's rows (cumulative counts)
    inverse: torch.Tensor  # [M] sorted position of flat pair i = t * k + j
    weight: torch.Tensor   # [M] router weight of each sorted row


def moe_route(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_local_experts: int,
              expert_map: torch.Tensor | None = None) -> MoeRouting:
    """Sort the flattened (token, k) pairs by local expert (stable, so a token's pairs keep their
    order within an expert, as in fused_moe_ref). Counts use scatter_add rather than bincount:
    bincount's output length is data dependent (max + 1) and on CUDA it reads the max on the host."""
    T, k = topk_ids.shape
    E = num_local_experts
    flat = topk_ids.reshape(-1).long()
    if expert_map is not None:
        flat = expert_map[flat]
        flat = torch.where(flat >= 0, flat, torch.full_like(flat, E))
    sorted_e, order = torch.sort(flat, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts[:E].cumsum(0).to(torch.int32)
    inverse = torch.empty_like(order)
    inverse.scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return MoeRouting(token=torch.div(order, k, rounding_mode="floor"), expert=sorted_e,
                      valid=sorted_e < E, offs=offs, inverse=inverse,
                      weight=topk_weights.reshape(-1)[order])


def moe_unpermute(y_sorted: torch.Tensor, r: MoeRouting, T: int, k: int) -> torch.Tensor:
    """Sorted expert outputs [M, D] -> [T, D]: other-rank (and garbage) rows zeroed, rows gathered
    back to (token, k) order with the inverse permutation and summed over k (no index_add_)."""
    y = torch.where(r.valid[:, None], y_sorted, 0.0)
    y = y[r.inverse]
    return y if k == 1 else y.view(T, k, y.shape[-1]).sum(dim=1)


def _aligned(n: int, dtype: torch.dtype) -> bool:
    return (n * dtype.itemsize) % 16 == 0


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, hidden: int, inter: int) -> bool:
    """Whether torch._grouped_mm can run the experts: every row stride (hidden, intermediate) a
    multiple of 16 bytes, and a dtype the kernel takes. bf16 works everywhere (CPU, CUDA, and the
    fake-tensor meta used by torch.compile); fp32/fp16 only in eager mode on the CPU (the meta
    kernel, hence torch.compile, only takes bf16, and so does the CUDA CUTLASS kernel).
    On CUDA the kernel is sync free on sm90/sm100; on other GPUs torch's own fallback copies offs
    to the host (correct, but not capturable)."""
    if not hasattr(torch, "_grouped_mm") or not (_aligned(hidden, dtype) and _aligned(inter, dtype)):
        return False
    if dtype == torch.bfloat16:
        return True
    return device.type == "cpu" and dtype in (torch.float32, torch.float16) and not torch.compiler.is_compiling()


def grouped_moe_supported(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """herd's CPU kernel takes both weights (fp32 or bf16, K-major: eager and compiled alike), or
    grouped_mm_supported for these activations with [E, N, K] weights whose transpose is a
    column-major view the kernel takes as it is (no weight copy per call)."""
    if all(cpu_grouped_gemm_supported(x.dtype, w) for w in (w13, w2)):
        return True
    return (grouped_mm_supported(x.dtype, x.device, x.shape[-1], w2.shape[-1])
            and all(w.dim() == 3 and w.dtype == x.dtype and _weight_layout_ok(w) for w in (w13, w2)))


def _weight_layout_ok(w: torch.Tensor) -> bool:
    """Row-major [E, N, K] (its transpose is the column-major view CUDA kernels want) or K-major
    (relayout_for_cpu: the transpose is contiguous), row strides 16-byte aligned."""
    if w.stride(-1) == 1:
        return _aligned(w.stride(-2), w.dtype)
    return w.stride(-2) == 1 and _aligned(w.stride(-1), w.dtype)


# Up to this many rows per expert on average herd's kernel beats torch's CPU grouped GEMM; above
# it, torch's. fp32: 4.3x at 8 rows, 1.2-1.5x at 64-256, 1.1-1.2x at 512 on the benchmark MoE's
# shapes since the strips prefetch into L2; bf16: 1.25x at 8 rows, 0.9-1.0x at 16, and torch's
# bf16 dot products 1.4-2x faster from 32 up (docs/benchmarks.md).
CPU_KERNEL_MAX_ROWS_PER_EXPERT = MappingProxyType({torch.float32: 256, torch.bfloat16: 16})


# On CUDA, up to this many rows per expert on average (decode batches) herd's Triton grouped GEMM
# streams the expert weights faster than torch._grouped_mm, which is tiled for prefill-sized M.
TRITON_MAX_ROWS_PER_EXPERT = 32


def triton_moe_gemm(rows: int, num_experts: int, device: torch.device):
    """herd.ops.triton.moe_gemm.moe_gemm for a decode-sized grouped GEMM on CUDA, else None (CPU,
    prefill-sized, or Triton not installed)."""
    if device.type != "cuda" or rows > TRITON_MAX_ROWS_PER_EXPERT * num_experts:
        return None
    try:
        from herd.ops.triton.moe_gemm import moe_gemm
    except ImportError:
        return None
    return moe_gemm


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, K] sorted by expert, w [E, N, K] -> [M, N]; rows past offs[-1] are uninitialized.
    On the CPU herd's kernel where it takes the weights (it streams them 1.3-3x faster than
    torch's CPU grouped GEMM at decode batch sizes; docs/benchmarks.md), else torch._grouped_mm;
    the kernel also wherever torch's could not run (under tracing in fp32, unaligned rows). On
    CUDA herd's Triton kernel for decode-sized batches (triton_moe_gemm), else torch._grouped_mm."""
    moe_gemm = triton_moe_gemm(a.shape[0], w.shape[0], a.device)
    if moe_gemm is not None:
        return moe_gemm(a, w, offs)
    if cpu_grouped_gemm_supported(a.dtype, w) and (
            a.shape[0] <= CPU_KERNEL_MAX_ROWS_PER_EXPERT[a.dtype] * w.shape[0] or torch.compiler.is_compiling()
            or not _aligned(a.shape[-1], a.dtype)):
        return torch.ops.herd.cpu_grouped_gemm(a, w, offs)
    return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)


def _gathered_gemm(w13: torch.Tensor, w2: torch.Tensor):
    """Sync-free stand-in for the grouped GEMM: each row multiplies its own expert's weights,
    gathered per row (memory M x N x K, so only for traced decode-sized batches)."""
    weights = {"w13": w13, "w2": w2}

    def gemm(a, which, r):
        w = weights[which][r.expert.clamp(max=w13.shape[0] - 1)]   # [M, N, K]
        return torch.bmm(w, a[:, :, None].to(w.dtype))[:, :, 0].to(a.dtype)
    return gemm


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, apply_router_weight_on_input: bool = True,
              expert_map: torch.Tensor | None = None, gemm=None, linear=None,
              use_reference: bool = False) -> torch.Tensor:
    """Same contract as fused_moe_ref, with one grouped GEMM per projection for all experts.

    `gemm(a, which, routing) -> [M, N]` overrides the grouped GEMM (quantized weights; `which` is
    "w13" or "w2", `a` the sorted rows; rows of other-rank pairs may be left uninitialized). The
    caller passing `gemm` has checked that it can run. `linear` is the reference's per-expert
    override, used when this runs fused_moe_ref: use_reference=True, or (without `gemm`) shapes or a
    dtype torch._grouped_mm cannot take."""
    grouped = gemm is not None or grouped_moe_supported(x, w13, w2)
    if use_reference or not (grouped or torch.compiler.is_compiling()):
        return fused_moe_ref(x, w13, w2, topk_ids, topk_weights, apply_router_weight_on_input,
                             expert_map, linear)
    if not grouped:
        gemm = _gathered_gemm(w13, w2)  # traced graphs where the grouped kernel can't be traced
    T, k = topk_ids.shape
    r = moe_route(topk_ids, topk_weights, w13.shape[0], expert_map)
    w = r.weight.to(x.dtype)[:, None]
    a = x[r.token]
    if apply_router_weight_on_input:
        a = a * w
    if gemm is None:
        h = silu_and_mul(grouped_gemm(a, w13, r.offs))
        y = grouped_gemm(h, w2, r.offs)
    else:
        y = gemm(silu_and_mul(gemm(a, "w13", r)), "w2", r)
    if not apply_router_weight_on_input:
        y = y * w
    return moe_unpermute(y, r, T, k)
