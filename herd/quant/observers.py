"""FP8 E4M3 scale observers and the quantize / dequantize math of compressed-tensors.

Scales follow compressed-tensors' symmetric rule: min' = min(min, 0), max' = max(max, 0),
s = max(|min'|, |max'|) / 448, clamped to >= float32 eps. The scale is computed in the weight's
own dtype (bf16 for a bf16 model), as llm-compressor does, so our checkpoints match its scales.

Two weight observers:
  * minmax: one pass, s = amax / 448.
  * mse: shrink-factor grid search (llm-compressor's MSE observer): try p = 1.00, 0.99, ... for
    `int(maxshrink * grid)` steps, keep per channel the p with the smallest sum |fq(W) - W|^norm,
    stop after `patience` steps in which no channel improved.
"""
from __future__ import annotations

import torch

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
SCALE_EPS = float(torch.finfo(torch.float32).eps)
STRATEGIES = ("channel", "tensor")
OBSERVERS = ("mse", "minmax")


def _reduce_minmax(x: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel ([out, 1]) or per-tensor ([1]) min and max, in x's dtype."""
    if strategy == "channel":
        if x.dim() != 2:
            raise ValueError(f"channel strategy needs a 2-D [out, in] weight, got shape {tuple(x.shape)}")
        return x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    if strategy == "tensor":
        return x.amin().reshape(1), x.amax().reshape(1)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def scale_from_minmax(min_vals: torch.Tensor, max_vals: torch.Tensor) -> torch.Tensor:
    """Symmetric FP8 scale (compressed-tensors' calculate_qparams), in the dtype of the inputs."""
    min_vals = torch.minimum(min_vals, torch.zeros_like(min_vals))
    max_vals = torch.maximum(max_vals, torch.zeros_like(max_vals))
    amax = torch.maximum(min_vals.abs(), max_vals.abs())
    return (amax / FP8_E4M3_MAX).clamp(min=SCALE_EPS)


def scale_from_amax(amax: float | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-tensor scale [1] for an activation whose observed max |x| is `amax`."""
    a = torch.as_tensor(amax, dtype=dtype).reshape(1)
    return scale_from_minmax(-a, a)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / s clamped to +-448 (the cast does not saturate), then round-to-nearest-even to E4M3."""
    return (x / scale.to(x.dtype)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """q * s in the scale's dtype (compressed-tensors' rule), optionally cast to `dtype`."""
    out = q.to(scale.dtype) * scale
    return out if dtype is None else out.to(dtype)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8(quantize_fp8(x, scale), scale.to(x.dtype))


def minmax_scale(w: torch.Tensor, strategy: str = "channel") -> torch.Tensor:
    lo, hi = _reduce_minmax(w, strategy)
    return scale_from_minmax(lo, hi)


def mse_scale(
    w: torch.Tensor,
    strategy: str = "channel",
    grid: int = 100,
    maxshrink: float = 0.20,
    norm: float = 2.4,
    patience: int = 5,
) -> torch.Tensor:
    """Scale that minimises sum |fake_quant(W) - W|^norm over shrink factors p = 1 - i/grid."""
    lo, hi = _reduce_minmax(w, strategy)
    best_scale = scale_from_minmax(lo, hi)
    best_err = torch.full_like(best_scale, float("inf"), dtype=torch.float32)
    w32 = w.float()
    sum_dims = (1,) if strategy == "channel" else tuple(range(w.dim()))
    stale = 0
    for i in range(int(maxshrink * grid)):
        p = 1.0 - i / grid
        scale = scale_from_minmax(p * lo, p * hi)
        # the error is accumulated in fp32: summing |err|^2.4 over a row in bf16 would lose it
        err = (fake_quantize_fp8(w, scale).float() - w32).abs_().pow_(norm).sum(dim=sum_dims)
        err = err.reshape(best_err.shape)
        better = err < best_err
        if better.any():
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            stale = 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_scale


def observe_weight_scale(w: torch.Tensor, strategy: str = "channel", observer: str = "mse") -> torch.Tensor:
    """Scale for weight `w` ([out, 1] for channel, [1] for tensor) in w's dtype."""
    if observer == "mse":
        return mse_scale(w, strategy)
    if observer == "minmax":
        return minmax_scale(w, strategy)
    raise ValueError(f"unknown observer {observer!r}; expected one of {OBSERVERS}")


def quantize_weight(
    w: torch.Tensor, strategy: str = "channel", observer: str = "mse"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale) for one [out, in] weight; the scale keeps the weight's dtype."""
    if not w.is_floating_point():
        raise ValueError(f"cannot quantize a {w.dtype} tensor")
    scale = observe_weight_scale(w, strategy, observer)
    return quantize_fp8(w, scale), scale
