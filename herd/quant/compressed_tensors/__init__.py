"""compressed-tensors FP8 checkpoints (`format: float-quantized`), read and written by herd.

What a checkpoint holds per quantized Linear `X` (HF module name):
  X.weight        float8_e4m3fn [out, in]
  X.weight_scale  model dtype, [out, 1] (channel) or [1] (tensor)
  X.input_scale   model dtype, [1], static activation schemes only
Llama 4 routed experts are stored per expert: `...feed_forward.experts.{e}.{gate,up,down}_proj`.

compressed_config.py: schemes and config.json; compressed_reader.py / compressed_writer.py: files;
compressed_experts.py: fused <-> per-expert Llama 4 experts. This module gathers the public API.
"""
from herd.quant.compressed_tensors.config import (
    DEFAULT_IGNORE,
    FLOAT_QUANTIZED,
    QUANT_METHOD,
    CompressedTensorsFP8Config,
    FP8Scheme,
    QuantizationArgs,
    build_quantization_config,
    fp8_scheme,
    herd_to_hf_modules,
    is_compressed_fp8_checkpoint,
    is_ignored,
    match_name,
    read_compressed_config,
)
from herd.quant.compressed_tensors.experts import fuse_expert_tensors, split_fused_experts
from herd.quant.compressed_tensors.reader import (
    CompressedCheckpoint,
    FP8LinearTensors,
    load_compressed_checkpoint_tensors,
)
from herd.quant.compressed_tensors.writer import quantize_checkpoint
from herd.quant.observers import dequantize_fp8, quantize_fp8, quantize_weight

__all__ = [
    "DEFAULT_IGNORE", "FLOAT_QUANTIZED", "QUANT_METHOD", "CompressedTensorsFP8Config", "FP8Scheme",
    "QuantizationArgs", "build_quantization_config", "fp8_scheme", "herd_to_hf_modules", "is_compressed_fp8_checkpoint",
    "is_ignored", "match_name", "read_compressed_config", "fuse_expert_tensors", "split_fused_experts",
    "CompressedCheckpoint", "FP8LinearTensors", "load_compressed_checkpoint_tensors",
    "quantize_checkpoint", "dequantize_fp8", "quantize_fp8", "quantize_weight",
]
