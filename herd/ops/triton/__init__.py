"""herd's Triton kernels outside attention (which has its own backend folder): the grouped MoE
GEMM for decode-sized batches (moe_gemm) and per-token FP8 quantization (fp8_quant). Import them
only where Triton is installed: herd.ops.moe.triton_moe_gemm and herd.ops.fp8.quantize_per_token
do, and fall back to torch without it. This package itself imports no Triton."""

import os


def interpreting() -> bool:
    """Whether Triton runs interpreted on the CPU (TRITON_INTERPRET=1, read when Triton loads):
    the kernels then work around the interpreter's faults (bf16 dots, fp32 -> fp8 rounding)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
