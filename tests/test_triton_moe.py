"""herd's Triton grouped MoE GEMM (herd/ops/triton/moe_gemm.py) vs torch._grouped_mm, its
reference. Without CUDA the kernel runs under the Triton CPU interpreter (set before triton loads)
on small shapes; on CUDA the same cases run compiled."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from herd.ops.fp8 import FP8_DTYPE, quantize_per_token  # noqa: E402
from herd.ops.moe import TRITON_MAX_ROWS_PER_EXPERT, triton_moe_gemm  # noqa: E402
from herd.ops.triton.moe_gemm import MoeGemmConfig, default_config, moe_gemm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def routed_rows(M, E, seed, *, skip=(), foreign=0):
    """Expert end offsets for M rows sorted by expert (experts in `skip` get none); the last
    `foreign` rows belong to no local expert (EP: past offs[-1], never written)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in skip])
    ids = allowed[torch.randint(0, len(allowed), (M - foreign,), generator=g)]
    return torch.bincount(ids, minlength=E).cumsum(0).to(torch.int32)


CASES = [  # M, E, N, K, skip, foreign
    pytest.param(1, 4, 48, 40, (), 0, id="one-row"),
    pytest.param(7, 5, 33, 24, (1, 3), 0, id="empty-experts-odd-N"),
    pytest.param(40, 3, 64, 72, (), 0, id="several-m-tiles"),
    pytest.param(12, 4, 32, 16, (), 5, id="foreign-rows"),
    pytest.param(0, 4, 32, 16, (), 0, id="no-rows"),
]


@pytest.mark.parametrize("M,E,N,K,skip,foreign", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_gemm_matches_grouped_mm(M, E, N, K, skip, foreign, dtype):
    g = torch.Generator().manual_seed(M * 31 + N)
    a = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(E, N, K, generator=g).to(dtype)
    offs = routed_rows(M, E, seed=M + K, skip=skip, foreign=foreign)
    n = int(offs[-1])
    ref = torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)[:n] if M else torch.empty(0, N, dtype=dtype)
    # default tiles, and tiles small enough that several M, N and K tiles loop
    for cfg in (None, MoeGemmConfig(16, 16, 16, num_warps=4, num_stages=2)):
        out = moe_gemm(a.to(DEVICE), w.to(DEVICE), offs.to(DEVICE), config=cfg)
        assert out.shape == (M, N) and out.dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[:n].cpu().float(), ref.float(), rtol=tol, atol=tol * 4)


def test_moe_gemm_takes_any_weight_strides():
    """K-major experts (the CPU loader's layout) give the same product as row-major ones."""
    E, N, K, M = 3, 40, 24, 9
    w = torch.randn(E, N, K)
    w_kmajor = w.transpose(1, 2).contiguous().transpose(1, 2)
    a = torch.randn(M, K)
    offs = routed_rows(M, E, seed=2)
    one = moe_gemm(a.to(DEVICE), w.to(DEVICE), offs.to(DEVICE))
    two = moe_gemm(a.to(DEVICE), w_kmajor.to(DEVICE), offs.to(DEVICE))
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [1, 19])
def test_moe_gemm_fp8_matches_the_dequantized_product(M):
    """W8A8: per-row activation scales times per-channel weight scales, as torch._scaled_grouped_mm."""
    E, N, K = 4, 48, 64
    g = torch.Generator().manual_seed(M)
    a = torch.randn(M, K, generator=g)
    w = torch.randn(E, N, K, generator=g)
    offs = routed_rows(M, E, seed=M, skip=(2,))
    aq, a_scale = quantize_per_token(a)
    w_scale = w.abs().amax(-1, keepdim=True) / 448
    wq = (w / w_scale).to(FP8_DTYPE)
    ref = torch._grouped_mm(aq.float() * a_scale, (wq.float() * w_scale).transpose(-2, -1), offs=offs)
    out = moe_gemm(aq.to(DEVICE), wq.to(DEVICE), offs.to(DEVICE), a_scale.to(DEVICE), w_scale.to(DEVICE),
                   out_dtype=torch.float32)
    n = int(offs[-1])
    torch.testing.assert_close(out[:n].cpu(), ref[:n], rtol=1e-4, atol=1e-3)


def test_moe_gemm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        moe_gemm(torch.randn(3, 8), torch.randn(2, 4, 16), torch.tensor([1, 3], dtype=torch.int32))


def test_default_tiles_cover_the_rows_per_expert():
    assert default_config(1, 16, 16384, 5120, False).block_m == 16
    assert default_config(256, 16, 16384, 5120, False).block_m == 32
    assert default_config(4096, 16, 16384, 5120, False).block_m == 64
    # shared memory per stage stays well inside a Hopper SM's 227 KB at every stage count
    for M in (1, 64, 256, 512, 4096):
        for scaled in (False, True):
            c = default_config(M, 16, 16384, 5120, scaled)
            size = 1 if scaled else 2
            assert (c.block_m + c.block_n) * c.block_k * size * c.num_stages <= 200 * 1024, (M, scaled, c)


def test_the_triton_path_is_for_decode_sizes_on_cuda_only():
    cuda = torch.device("cuda")
    assert triton_moe_gemm(64, 16, torch.device("cpu")) is None
    assert triton_moe_gemm(TRITON_MAX_ROWS_PER_EXPERT * 16 + 1, 16, cuda) is None
    assert triton_moe_gemm(TRITON_MAX_ROWS_PER_EXPERT * 16, 16, cuda) is moe_gemm
