"""FP8 (E4M3FN) GEMMs: per-token dynamic or static per-tensor activation scales, per-channel or
per-tensor weight scales. The torch reference dequantizes and multiplies in the activation dtype;
on CUDA (Hopper and newer) torch._scaled_mm runs the GEMM in FP8 with the same scales."""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (fp8 [T, K], scale [T, 1] fp32) with scale = max|x_row| / 448. The divisor is
    a tensor on x's device: torch multiplies a CUDA tensor by the reciprocal of a Python scalar,
    which rounds some scales one ulp away from the quotient (CPU and the Triton kernel divide)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / amax.new_full((), FP8_MAX)).clamp(min=_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


_TINY = torch.finfo(torch.bfloat16).tiny


def quantize_per_token_pow2(x: torch.Tensor, backoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """INC's dynamic per-token scales (maxabs_pcs_pow2 and act_maxabs_pcs_pow2_*): x [T, K] ->
    (fp8, scale [T, 1]) with scale = 2^ceil(log2(max(max|x_row| / (448 * backoff), tiny))), so a
    row's largest value lands in (224, 448] * backoff."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    raw = (amax / amax.new_full((), FP8_MAX * backoff)).clamp(min=_TINY)
    scale = torch.exp2(torch.ceil(torch.log2(raw)))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


# herd's one-kernel Triton quantization on CUDA (herd/ops/triton/fp8_quant.py): bit-identical to
# the reference under the Triton interpreter and compiled for sm90 in the tests, off until a GPU
# run confirms it there (benchmarks/gpu_check.py: the fp8_quant kernel cases, the fp8-triton perf run).
TRITON_PER_TOKEN_QUANT = False


def quantize_per_token(x: torch.Tensor, pow2_backoff: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token_ref's result (with `pow2_backoff`, INC's power-of-two scales:
    quantize_per_token_pow2); on CUDA, with TRITON_PER_TOKEN_QUANT, herd's one-kernel Triton
    version where Triton is installed."""
    if pow2_backoff is not None:
        return quantize_per_token_pow2(x, pow2_backoff)
    if TRITON_PER_TOKEN_QUANT and x.is_cuda and x.dim() == 2:
        try:
            from herd.ops.triton.fp8_quant import per_token_quant
        except ImportError:
            pass
        else:
            return per_token_quant(x)
    return quantize_per_token_ref(x)


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 [N, K], scale [N, 1] or [1] fp32), min-max scales."""
    amax = w.abs().amax(dim=-1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = (amax.float() / FP8_MAX).clamp(min=_MIN_SCALE)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear_ref(xq, x_scale, wq, w_scale, out_dtype) -> torch.Tensor:
    """Reference: both operands dequantized exactly (fp8 values times fp32 scales), fp32 matmul."""
    x = xq.float() * x_scale.float()
    w = wq.float() * w_scale.float().reshape(-1, 1) if w_scale.numel() > 1 else wq.float() * w_scale.float()
    return F.linear(x, w).to(out_dtype)


def _scaled_mm_ok(x: torch.Tensor, wq: torch.Tensor) -> bool:
    if not (x.is_cuda and hasattr(torch, "_scaled_mm")):
        return False
    major, _ = torch.cuda.get_device_capability(x.device)
    return major >= 9 and x.shape[-1] % 16 == 0 and wq.shape[0] % 16 == 0


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, pow2_backoff: float | None = None) -> torch.Tensor:
    """y = x @ dequant(wq).T with x quantized to FP8: per token (scale max / 448, or INC's power of
    two with `pow2_backoff`), or with a static input_scale."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if input_scale is None:
        xq, x_scale = quantize_per_token(x2, pow2_backoff)
    else:
        xq, x_scale = quantize_static(x2, input_scale), input_scale.float().reshape(1, 1)
    if _scaled_mm_ok(x2, wq):
        a_scale = x_scale.expand(x2.shape[0], 1).contiguous() if x_scale.numel() == 1 else x_scale
        b_scale = (w_scale.float().reshape(1, -1) if w_scale.numel() > 1
                   else w_scale.float().reshape(1, 1).expand(1, wq.shape[0])).contiguous()
        y = torch._scaled_mm(xq, wq.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=x.dtype)
    else:
        y = fp8_linear_ref(xq, x_scale, wq, w_scale, x.dtype)
    return y.reshape(*shape[:-1], wq.shape[0])
