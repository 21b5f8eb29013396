"""Per-token dynamic FP8 quantization in one Triton kernel: herd.ops.fp8.quantize_per_token_ref's
result, bit for bit (scale = max(max|x_row| / 448, 1 / (448 * 512)), q = clamp(x / scale, +-448)
as e4m3, both quotients correctly rounded). In torch that is an abs, a row max, two divides, a
clamp and two casts, six or seven kernels per projection; an FP8 decode step of a Scout-shaped
model ran ~1,000 more kernels than a BF16 one on an H200 (docs/benchmarks.md). One program per
row: a pass for the max, a pass to quantize (the row is re-read from L2 or HBM; at decode sizes
the rows are a few KB).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from herd.ops.triton import interpreting


@triton.jit
def round_to_e4m3_grid(x):
    """Round fp32 x (already clamped to +-448) to the nearest e4m3 value, ties to even, staying
    in fp32. Only used under the Triton interpreter, whose fp32 -> fp8 cast mis-rounds values that
    carry into the next power of two (127.6 -> 64); exactly representable values cast correctly.
    e4m3 has 3 mantissa bits, so a value in [2^e, 2^(e+1)) sits on a grid of 2^(e-3), and
    subnormals (e < -6) on the grid 2^-9."""
    a = tl.abs(x)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)          # 2^(e-3), built from bits
    # adding and removing 1.5 * 2^23 rounds a float below 2^22 to an integer, ties to even
    r = ((a / ulp + 12582912.0) - 12582912.0) * ulp
    return tl.where(x.to(tl.int32, bitcast=True) < 0, -r, r)             # keeps -0.0


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                            BLOCK_K: tl.constexpr, SOFT_FP8_ROUND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), 1.0 / (448.0 * 512.0))
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=ok, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
        if SOFT_FP8_ROUND:
            q = round_to_e4m3_grid(q)
        tl.store(q_ptr + row * stride_q + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=ok)


def per_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (bf16 / fp16 / fp32) -> (float8_e4m3fn [T, K], fp32 scales [T, 1])."""
    T, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(T, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(T, 1, dtype=torch.float32, device=x.device)
    if T == 0:
        return q, s
    block = min(triton.next_power_of_2(K), 4096)
    _per_token_quant_kernel[(T,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK_K=block,
                                  SOFT_FP8_ROUND=interpreting(), num_warps=4 if block >= 1024 else 1)
    return q, s
