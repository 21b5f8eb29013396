"""FP8 formats, full-scale values and hardware-aligned scale sets (plain torch, works on CPU).

Three formats matter:
* E4M3FN (torch.float8_e4m3fn, max 448): CUDA and Gaudi3.
* Gaudi2 E4M3: IEEE-style E4M3 whose top exponent is reserved, so the range is +-240. Its value grid is
  the E4M3FN grid cut at 240, which is why it is emulated as "clamp to 240, cast to float8_e4m3fn".
* E5M2 (torch.float8_e5m2, max 57344).

A scale `s` is the dequant multiplier: x ~= s * fp8(x / s). Gaudi applies a power-of-two scale that
matches one of its exponent biases for free inside the cast, hence the "hardware-aligned" scale sets.
CUDA multiplies by the scale in the GEMM epilogue, so any float scale is allowed there.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

# Smallest normal bf16; INC floors per-channel and per-token raw scales here so log2 stays finite.
TINY_BF16 = torch.finfo(torch.bfloat16).tiny


@dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: torch.dtype     # storage dtype of the quantized tensor
    max: float             # largest finite magnitude (the range used for saturation)
    exp_bits: int

    @property
    def default_bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1


E4M3FN = Fp8Format("e4m3fn", torch.float8_e4m3fn, 448.0, 4)
E4M3_GAUDI2 = Fp8Format("e4m3_gaudi2", torch.float8_e4m3fn, 240.0, 4)
E5M2 = Fp8Format("e5m2", torch.float8_e5m2, 57344.0, 5)


class ScaleDevice(str, Enum):
    """Which accelerator the scales are computed for (QUANT_CONFIG `device_for_scales`)."""
    GAUDI2 = "GAUDI2"
    GAUDI3 = "GAUDI3"
    CUDA = "CUDA"

    @classmethod
    def parse(cls, value: "str | ScaleDevice") -> "ScaleDevice":
        if isinstance(value, ScaleDevice):
            return value
        key = str(value).strip().upper()
        aliases = {"G2": "GAUDI2", "G3": "GAUDI3", "GPU": "CUDA", "E4M3FN": "CUDA", "E4M3FN-448": "CUDA"}
        key = aliases.get(key, key)
        if key not in cls.__members__:
            raise ValueError(f"unknown device for scales {value!r}; choose GAUDI2, GAUDI3 or CUDA")
        return cls[key]

    @property
    def tag(self) -> str:
        """Short name used in file names (g2 / g3 / cuda), as calibrate_model.sh does for Gaudi."""
        return {"GAUDI2": "g2", "GAUDI3": "g3", "CUDA": "cuda"}[self.value]


def fp8_format(device: "str | ScaleDevice", fp8_config: str = "E4M3") -> Fp8Format:
    """The FP8 format a device uses for QUANT_CONFIG `fp8_config` (E4M3 or E5M2)."""
    device = ScaleDevice.parse(device)
    kind = str(fp8_config).strip().upper()
    if kind == "E5M2":
        return E5M2
    if kind not in ("E4M3", "E4M3FN"):
        raise ValueError(f"unknown fp8_config {fp8_config!r}; choose E4M3 or E5M2")
    return E4M3_GAUDI2 if device is ScaleDevice.GAUDI2 else E4M3FN


def fullscale(fmt: Fp8Format, exp_bias: int | None = None) -> float:
    """Largest magnitude representable with exponent bias `exp_bias` (default: the format's own bias)."""
    bias = fmt.default_bias if exp_bias is None else exp_bias
    return fmt.max * 2.0 ** (fmt.default_bias - bias)


def hw_exp_biases(device: "str | ScaleDevice", fmt: Fp8Format) -> list[int] | None:
    """Exponent biases the hardware cast applies for free; None where any scale works (CUDA)."""
    device = ScaleDevice.parse(device)
    if device is ScaleDevice.GAUDI2:
        return [15] if fmt.exp_bits == 5 else [3, 7, 11, 15]
    if device is ScaleDevice.GAUDI3:
        return list(range(0, 63))  # INC uses range(0, 63): 63 itself is excluded
    return None


def hw_scales(device: "str | ScaleDevice", fmt: Fp8Format) -> list[float] | None:
    """HW-aligned scale set fullscale(bias)/fullscale(default), in INC's order (descending)."""
    biases = hw_exp_biases(device, fmt)
    if biases is None:
        return None
    return [fullscale(fmt, b) / fullscale(fmt) for b in biases]


def opt_weight_candidates(device: "str | ScaleDevice", fmt: Fp8Format) -> list[float]:
    """Candidate scales for the `maxabs_hw_opt_weight` search. CUDA has no HW set, so it borrows
    the Gaudi3 power-of-two ladder (same 448 range, same exponent-bias arithmetic)."""
    scales = hw_scales(device, fmt)
    return scales if scales is not None else hw_scales(ScaleDevice.GAUDI3, fmt)


@dataclass(frozen=True)
class HwTraits:
    min_scale: float
    max_scale: float
    step: int  # exponent step between neighbouring HW scales


def hw_traits(device: "str | ScaleDevice", fmt: Fp8Format) -> HwTraits | None:
    """(min, max, step) for HW-aligned rounding: Gaudi2 E4M3 (2^-8, 2^4, 4), Gaudi3 (2^-55, 2^7, 1)."""
    scales = hw_scales(device, fmt)
    if scales is None:
        return None
    biases = hw_exp_biases(device, fmt)
    step = biases[1] - biases[0] if len(biases) > 1 else 1
    return HwTraits(min(scales), max(scales), step)


def cast_to_fp8(x: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Saturating cast: clamp to the format's range first (torch's cast would give NaN / the wrong
    neighbour for out-of-range values), then round to nearest."""
    return x.float().clamp(-fmt.max, fmt.max).to(fmt.dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor | float, fmt: Fp8Format = E4M3FN) -> torch.Tensor:
    """fp8(x / scale) with saturation. `scale` must broadcast against x (per-channel weight
    scales of shape [out] must be passed as [out, 1])."""
    return cast_to_fp8(x.float() / torch.as_tensor(scale, dtype=torch.float32), fmt)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * torch.as_tensor(scale, dtype=torch.float32)).to(dtype)


def qdq(x: torch.Tensor, scale: torch.Tensor | float, fmt: Fp8Format = E4M3FN) -> torch.Tensor:
    """Quantize-dequantize (fake quant) in float32: scale * fp8(x / scale)."""
    return dequantize(quantize(x, scale, fmt), scale)


def pow2_ceil(r: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 r) computed exactly from the float's exponent (no log rounding); 0 stays 0."""
    r = torch.as_tensor(r, dtype=torch.float64)
    mant, exp = torch.frexp(r)  # r = mant * 2^exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    out = torch.ldexp(torch.ones_like(r), exp)
    return torch.where(r > 0, out, torch.zeros_like(r))


def dynamic_token_scales(x: torch.Tensor, fmt: Fp8Format, backoff: float) -> torch.Tensor:
    """Per-token (last-dim) power-of-two scales of INC's dynamic methods:
    2^ceil(log2(max(max_j |x[t, j]| / (fs * backoff), tiny_bf16))), keepdim."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).double()
    raw = torch.clamp(amax / (fmt.max * backoff), min=TINY_BF16)
    return pow2_ceil(raw).float()
