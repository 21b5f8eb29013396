"""herd's one-kernel per-token FP8 quantization (herd/ops/triton/fp8_quant.py) against its torch
reference, bit for bit. Without CUDA the kernel runs under the Triton CPU interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from herd.ops.fp8 import quantize_per_token_ref  # noqa: E402
from herd.ops.triton.fp8_quant import per_token_quant  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,K", [(1, 64), (5, 100), (3, 5000), (0, 32)])
def test_per_token_quant_is_bit_identical_to_the_reference(T, K, dtype):
    g = torch.Generator().manual_seed(T * 1000 + K)
    x = (torch.randn(T, K, generator=g) * torch.logspace(-3, 2, max(T, 1))[:T, None]).to(dtype)
    if T >= 3:
        x[1] = 0                                      # a zero row: the minimum scale
        x[2, :7] = torch.tensor([448.0, -447.9, 127.6, 0.75, 1e-6, -3e-3, 50.0]).to(dtype)
    q, s = per_token_quant(x.to(DEVICE))
    q_ref, s_ref = quantize_per_token_ref(x)
    assert q.shape == (T, K) and q.dtype == torch.float8_e4m3fn and s.shape == (T, 1)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


def test_per_token_quant_reads_row_strides():
    x = torch.randn(4, 96)[:, :80]                    # rows 96 apart, 80 wide
    q, s = per_token_quant(x.to(DEVICE))
    q_ref, s_ref = quantize_per_token_ref(x)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
