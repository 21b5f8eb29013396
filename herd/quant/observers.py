"""FP8 E4M3 scale observers and the quantize / dequantize math of compressed-tensors.

Scales follow compressed-tensors' symmetric rule: min' = min(min, 0), max' = max(max, 0),
s = max(|min'|, |max'|) / 448, clamped to >= float32 eps. The scale is computed in the weight's
own dtype (bf16 for a bf16 model), as llm-compressor does, so our checkpoints match its scales.

Two weight observers:
  * minmax: one pass, s = amax / 448.
  * mse: shrink-factor grid search (llm-compressor's MSE observer): try p = 1.00, 0.99, ... for
    `int(maxshrink * grid)` steps, keep per channel the p with the smallest sum |fq(W) - W|^norm,
    stop after `patience` steps in which no channel improved.

Rounding: round-to-nearest by default. With a calibration Hessian H = E[x x^T] of the layer's
inputs, `gptq_round` rounds the columns one by one and spreads each column's rounding error over
the columns not yet rounded (the GPTQ update), which minimises the output error ||(W - Q) x||
instead of ||W - Q||. The result is still one FP8 value per weight and the same scales, so the
checkpoint format does not change.
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


def fake_quantize_input(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """A linear's input as FP8 activations give it: per token (`scale` None: each row's maxabs /
    448), or with one static per-tensor scale (values past 448 * scale saturate)."""
    if scale is None:
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / 448.0).clamp(min=1e-12)
    return fake_quantize_fp8(x.float(), scale.to(x.device)).to(x.dtype)


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


def gptq_round(
    w: torch.Tensor,
    scale: torch.Tensor,
    hessian: torch.Tensor,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> torch.Tensor:
    """FP8 weight for `w` [out, in] with the given scale ([out, 1] or [1]), rounded column by column
    with the GPTQ error feedback under `hessian` [in, in] (sum or mean of x x^T over calibration
    tokens). `damp` adds damp * mean(diag H) to the diagonal (a singular H from few tokens stays
    invertible); `act_order` rounds the columns with the largest inputs first."""
    out_dim, n = w.shape
    if hessian.shape != (n, n):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match the weight's {n} inputs")
    W = w.detach().float().clone()
    H = hessian.detach().double().clone()
    s = scale.detach().float().reshape(-1, 1).expand(out_dim, 1)
    dead = torch.diag(H) <= 0  # inputs that were always zero: their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    # upper Cholesky factor of H^-1: row i holds the update that column i's error makes on columns > i
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.empty_like(W)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        Wb, Ub = W[:, i0:i1], U[i0:i1, i0:i1]
        Err = torch.empty_like(Wb)
        for j in range(i1 - i0):
            q = fake_quantize_fp8(Wb[:, j:j + 1], s)[:, 0]
            Q[:, i0 + j] = q
            Err[:, j] = (Wb[:, j] - q) / Ub[j, j]
            Wb[:, j + 1:] -= Err[:, j:j + 1] * Ub[j:j + 1, j + 1:]
        W[:, i1:] -= Err @ U[i0:i1, i1:]  # the block's errors on the later blocks, in one GEMM
    # Q holds q * s exactly representable values: dividing by s again gives back the FP8 codes
    return quantize_fp8(Q[:, torch.argsort(perm)], s)


def observe_weight_scale(w: torch.Tensor, strategy: str = "channel", observer: str = "mse") -> torch.Tensor:
    """Scale for weight `w` ([out, 1] for channel, [1] for tensor) in w's dtype."""
    if observer == "mse":
        return mse_scale(w, strategy)
    if observer == "minmax":
        return minmax_scale(w, strategy)
    raise ValueError(f"unknown observer {observer!r}; expected one of {OBSERVERS}")


def quantize_weight(
    w: torch.Tensor, strategy: str = "channel", observer: str = "mse", hessian: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale) for one [out, in] weight; the scale keeps the weight's dtype. With a
    calibration `hessian` the weight is rounded by `gptq_round` (same scale)."""
    if not w.is_floating_point():
        raise ValueError(f"cannot quantize a {w.dtype} tensor")
    scale = observe_weight_scale(w, strategy, observer)
    if hessian is not None:
        return gptq_round(w, scale, hessian.to(w.device)), scale
    return quantize_fp8(w, scale), scale
