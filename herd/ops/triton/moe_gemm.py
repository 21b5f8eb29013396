"""A grouped GEMM for MoE decode, in Triton: torch._grouped_mm's contract (a [M, K] rows sorted
by expert, w [E, N, K], offs [E] int32 cumulative row ends; rows past offs[-1] are not written),
in bf16 / fp16, or W8A8 FP8 with per-row activation scales and per-output-channel weight scales
(torch._scaled_grouped_mm's). Its reference is torch._grouped_mm (herd.ops.moe.grouped_gemm's
other path) and, in FP8, the dequantized product.

Why: at decode sizes (a few rows per expert) a GEMM tiled for large M reads the expert weights
far below the memory bandwidth (torch._grouped_mm, CUTLASS, reached 1.6-2.9 TB/s of the 4.3 a copy
reaches on an H200; this kernel 3.6-4.4 from batch 16 up, 2.2-3.1 at batch 1 with its best tiles;
docs/benchmarks.md). Here one program owns one (expert, BLOCK_N columns) tile and streams
that slice of the expert's weights once, for all of the expert's rows (BLOCK_M at a time); an
expert with no rows costs one load of its offsets and no weight traffic. Every size comes from
shapes, offsets are read on the device: no host sync, so a decode step stays capturable in a CUDA
graph.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from herd.ops.triton import interpreting

_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
       torch.float8_e4m3fn: tl.float8e4nv}


# On sm90 Triton lets FP8 tensor-core dots accumulate in their reduced-precision mode over the whole
# K loop unless told otherwise (max_num_imprecise_acc, default 2**30 there); promoting the partial
# sums to fp32 every 128 K elements is what cuBLAS-class FP8 GEMMs do.
FP8_PROMOTE_EVERY_K = 128


class MoeGemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int



@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, c_ptr, offs_ptr, a_scale_ptr, w_scale_ptr,
    N, K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn, stride_wse,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SCALED: tl.constexpr, DOT_DTYPE: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr,
):
    """Program (e, j): rows [offs[e-1], offs[e]) of a times columns j*BLOCK_N.. of w[e]^T."""
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    end = tl.load(offs_ptr + e).to(tl.int32)
    start = tl.load(offs_ptr + tl.maximum(e - 1, 0)).to(tl.int32)
    start = tl.where(e > 0, start, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        a_base = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            a = tl.load(a_base + kk[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        if SCALED:
            a_s = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
            w_s = tl.load(w_scale_ptr + e.to(tl.int64) * stride_wse + offs_n, mask=n_ok, other=0.0)
            acc = acc * a_s[:, None] * w_s[None, :]
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def default_config(M: int, E: int, N: int, K: int, scaled: bool) -> MoeGemmConfig:
    """Tiles by rows per expert: BLOCK_M covers about twice the mean (a busier expert loops).
    The N/K tiles are the fastest of a sweep on an H200 at Scout's expert shapes, 1-16 rows per
    expert (benchmarks/gpu_check.py moe_bench; docs/benchmarks.md): bf16 64 x 256, 3 stages; FP8
    32 x 256 for a few rows (few active experts: more programs stream weights), else 64 x 256.
    BLOCK_M 64 (17-32 rows per expert) keeps the 64 x 128 tiles that its parity check ran with."""
    per_expert = max(1, -(-M // E))
    block_m = min(64, max(16, triton.next_power_of_2(2 * per_expert)))
    if scaled:
        return MoeGemmConfig(block_m, 32 if M <= 4 else 64, 256, num_warps=4, num_stages=4)
    if block_m == 64:
        return MoeGemmConfig(block_m, 64, 128, num_warps=4, num_stages=4)
    return MoeGemmConfig(block_m, 64, 256, num_warps=4, num_stages=3)


def moe_gemm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, a_scale: torch.Tensor | None = None,
             w_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
             config: MoeGemmConfig | None = None) -> torch.Tensor:
    """a [M, K] sorted by expert, w [E, N, K], offs [E] -> [M, N] (rows past offs[-1] unwritten).
    FP8: a and w float8_e4m3fn, a_scale [M] (or [M, 1]) and w_scale [E, N] (or [E, N, 1]) fp32,
    out_dtype the result type (bf16 / fp16)."""
    M, K = a.shape
    E, N, Kw = w.shape
    if Kw != K or offs.shape != (E,):
        raise ValueError(f"moe_gemm: a {tuple(a.shape)}, w {tuple(w.shape)}, offs {tuple(offs.shape)} do not match")
    scaled = a_scale is not None
    out = torch.empty(M, N, dtype=out_dtype or a.dtype, device=a.device)
    if M == 0:
        return out
    cfg = config or default_config(M, E, N, K, scaled)
    if scaled:
        a_scale = a_scale.reshape(M).float()
        w_scale = w_scale.reshape(E, N).float()
        if w_scale.stride(-1) != 1:
            w_scale = w_scale.contiguous()
    dot = tl.float32 if interpreting() else _TL[a.dtype]   # the interpreter's low-precision dots are unreliable
    grid = (E, triton.cdiv(N, cfg.block_n))
    _moe_gemm_kernel[grid](
        a, w, out, offs, a_scale if scaled else offs, w_scale if scaled else offs,
        N, K,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        w_scale.stride(0) if scaled else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SCALED=scaled, DOT_DTYPE=dot,
        MAX_IMPRECISE_ACC=min(FP8_PROMOTE_EVERY_K, cfg.block_k) if scaled else None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
