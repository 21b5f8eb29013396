"""Runtime quant methods: how a Linear or FusedMoE layer stores its weights and runs its GEMM.

The model asks a factory (`linear(prefix)`, `moe(prefix)`) for each layer's method, so the model
code never branches on precision. `fp8` holds online FP8 and compressed-tensors checkpoints, `inc`
INC static scales from QUANT_CONFIG measurements. The offline toolchains that write those files are
herd.quant.inc and herd.quant.compressed_tensors.
"""
from __future__ import annotations

from herd.parallel.context import SINGLE, TPContext
from herd.quant.methods.fp8 import (CompressedTensorsQuantMethods, Fp8LinearMethod, Fp8MoEMethod,
                                    Fp8QuantMethods)

__all__ = ["CompressedTensorsQuantMethods", "Fp8LinearMethod", "Fp8MoEMethod", "Fp8QuantMethods",
           "build_quant_methods", "get_quant_methods"]


def get_quant_methods(config, tp=None) :
    """`tp` is accepted for symmetry with the executors; rank-specific work (INC files) reads the
    model's own TPContext in post_load."""
    q = config.quant.quantization
    if q == "fp8":
        return Fp8QuantMethods()
    if q == "compressed-tensors":
        from herd.quant.compressed_tensors.config import CompressedTensorsFP8Config, checkpoint_ffn_name
        ct = CompressedTensorsFP8Config.from_config(config.model.hf_config.raw)
        if ct is None:
            raise ValueError(f"{config.model.model} has no compressed-tensors quantization_config")
        return CompressedTensorsQuantMethods(ct, checkpoint_ffn_name(config.model.hf_config))
    if q == "inc":
        from herd.quant.methods.inc import get_inc_quant_methods
        return get_inc_quant_methods(config)
    raise ValueError(f"unsupported quantization {q!r}")


def build_quant_methods(config, tp: TPContext = SINGLE):
    """Every rank builds its own quant methods; `tp` tells them which rank they serve (INC writes
    and reads per-rank measurement files). None for an unquantized model."""
    if config.quant.quantization is None:
        return None
    return get_quant_methods(config, tp=tp)
