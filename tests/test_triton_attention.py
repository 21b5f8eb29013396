"""Triton paged-attention kernels vs readable references.

Without CUDA the kernels run under the Triton CPU interpreter (the flag must be set before triton
is imported). Shapes are tiny because the interpreter is slow. The comparisons are in fp32/fp16;
one bf16 case checks the kernels' bf16 path (under the interpreter they upcast bf16 dot operands,
since the interpreter's bf16 tl.dot is wrong).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from herd.attention.backends.triton.kernels import (  # noqa: E402
    paged_attention, paged_decode, reshape_and_cache,
)
from herd.ops.attention import decode_attention_ref, paged_attention_ref, store_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
FP8_TOL = {torch.float32: 1e-3, torch.float16: 3e-3}


def cdiv(a, b):
    return -(-a // b)


def window_start(pos: int, chunk):
    return 0 if chunk is None else (pos // chunk) * chunk


class Batch:
    """A paged KV cache holding each sequence's context, for q_lens[b] queries at the end of
    seq_lens[b] tokens. Physical blocks are shuffled; the table has spare -1 columns; blocks left
    of a sequence's first-query window are freed (-1) on chunked layers. Every slot that must not
    be read (freed blocks, spare blocks, slots past seq_len) holds `fill` (NaN by default)."""

    def __init__(self, q_lens, seq_lens, *, bs, chunk, H, Hkv, d, dtype, kv_dtype=None,
                 k_scale=1.0, v_scale=1.0, bt_dtype=torch.int32, fill=float("nan"), seed=0):
        g = torch.Generator().manual_seed(seed)
        kv_dtype = kv_dtype or dtype
        self.q_lens, self.seq_lens, self.bs, self.chunk = list(q_lens), list(seq_lens), bs, chunk
        self.k_scale, self.v_scale, self.scale = k_scale, v_scale, d ** -0.5
        B = len(q_lens)
        n_blocks = [cdiv(s, bs) for s in seq_lens]
        num_blocks = sum(n_blocks) + 2
        perm = torch.randperm(num_blocks, generator=g).tolist()
        table = torch.full((B, max(n_blocks) + 2), -1, dtype=torch.int64)
        for b, n in enumerate(n_blocks):
            table[b, :n] = torch.tensor([perm.pop() for _ in range(n)])
        if chunk is not None:   # free the blocks entirely left of the first query's chunk
            for b in range(B):
                first = seq_lens[b] - q_lens[b]
                table[b, : window_start(first, chunk) // bs] = -1
        self.table = table

        # every sequence's K/V for positions [0, seq_len), stored wherever its block is live
        self.k = [torch.randn(s, Hkv, d, generator=g).to(dtype) for s in seq_lens]
        self.v = [torch.randn(s, Hkv, d, generator=g).to(dtype) for s in seq_lens]
        self.k_cache = torch.full((num_blocks, bs, Hkv, d), fill).to(kv_dtype)
        self.v_cache = torch.full((num_blocks, bs, Hkv, d), fill).to(kv_dtype)
        slots = torch.cat([self.slots(b, range(s)) for b, s in enumerate(seq_lens)])
        store_kv(torch.cat(self.k), torch.cat(self.v), self.k_cache, self.v_cache, slots,
                 float(k_scale), float(v_scale))

        T = sum(q_lens)
        self.q = torch.randn(T, H, d, generator=g).to(dtype)
        self.qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
        self.bt = table.to(bt_dtype)

    def slots(self, b, positions):
        """Flat slots of sequence b's positions; -1 where the block is freed."""
        pos = torch.as_tensor(list(positions), dtype=torch.int64)
        phys = self.table[b, pos // self.bs]
        return torch.where(phys >= 0, phys * self.bs + pos % self.bs, -1)

    def dev(self):
        """(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens) on the test device."""
        return (self.q.to(DEVICE), self.k_cache.to(DEVICE), self.v_cache.to(DEVICE), self.bt.to(DEVICE),
                self.qsl.to(DEVICE), torch.tensor(self.seq_lens, dtype=torch.int32, device=DEVICE))

    def kwargs(self):
        return dict(chunk=self.chunk, scale=self.scale, k_scale=self.k_scale, v_scale=self.v_scale,
                    max_seq_len=max(self.seq_lens))


def dequant(cache, scale):
    if cache.dtype == FP8:
        return cache.float() * float(scale)
    return cache


def dense_ref(batch: Batch) -> torch.Tensor:
    """Loop over every query; gather exactly the keys it may see through the block table (asserting
    none of them sits in a freed block) and softmax in float64."""
    kc = dequant(batch.k_cache, batch.k_scale).double()
    vc = dequant(batch.v_cache, batch.v_scale).double()
    q = batch.q.double()
    H, Hkv = q.shape[1], kc.shape[2]
    out = torch.zeros_like(q)
    for b, (ql, sl) in enumerate(zip(batch.q_lens, batch.seq_lens)):
        start = int(batch.qsl[b])
        for i in range(ql):
            p = sl - ql + i
            pos = torch.arange(window_start(p, batch.chunk), p + 1)
            phys = batch.table[b, pos // batch.bs]
            assert (phys >= 0).all(), "the reference itself would read a freed block"
            k = kc[phys, pos % batch.bs].repeat_interleave(H // Hkv, dim=1)   # [n, H, d]
            v = vc[phys, pos % batch.bs].repeat_interleave(H // Hkv, dim=1)
            w = torch.einsum("hd,nhd->hn", q[start + i], k).mul(batch.scale).softmax(-1)
            out[start + i] = torch.einsum("hn,nhd->hd", w, v)
    return out


def assert_close(actual, expected, tol):
    actual = actual.detach().cpu().double()
    assert torch.isfinite(actual).all(), "NaN/inf in the kernel output (read an unreadable slot?)"
    err = (actual - expected.double()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol:.1g}"


# A mixed batch: decode, prefill from scratch, a sequence with no queries this step, decode,
# chunked prefill on cached context whose queries cross a chunk boundary.
MIXED_Q = [1, 7, 0, 1, 20]
MIXED_S = [30, 7, 12, 50, 55]
MIXED_Q_128 = [1, 9, 0, 1, 20]
MIXED_S_128 = [140, 9, 12, 200, 150]

ATTN_CASES = [
    # bs, chunk, H, Hkv, d, dtype, kv_dtype, k_scale, v_scale, bt_dtype
    pytest.param(16, 24, 4, 2, 32, torch.float32, None, 1.0, 1.0, torch.int32, id="bs16-chunk24-gqa2-fp32"),
    pytest.param(16, None, 8, 1, 16, torch.float16, None, 1.0, 1.0, torch.int64, id="bs16-global-gqa8-fp16"),
    pytest.param(128, None, 4, 2, 16, torch.float32, None, 1.0, 1.0, torch.int64, id="bs128-global-fp32"),
    pytest.param(128, 48, 5, 1, 16, torch.float16, None, 1.0, 1.0, torch.int32, id="bs128-chunk48-gqa5-fp16"),
    # G=8 and 20 queries: two query tiles, the second starting inside the later chunk
    pytest.param(16, 24, 8, 1, 32, torch.float32, FP8, 0.05, "tensor:0.03", torch.int32, id="bs16-chunk24-gqa8-fp8"),
    pytest.param(16, None, 8, 1, 16, torch.float16, FP8, "tensor:0.02", 0.04, torch.int64, id="bs16-global-fp8-fp16"),
    # bf16: the kernels upcast the dot operands under the interpreter (its bf16 dot is wrong)
    pytest.param(16, 24, 4, 2, 16, torch.bfloat16, None, 1.0, 1.0, torch.int32, id="bs16-chunk24-bf16"),
]


def _scale(s):
    """'tensor:x' -> a 1-element fp32 device tensor (the kernels read it on the device)."""
    if isinstance(s, str):
        return torch.tensor([float(s.split(":")[1])], dtype=torch.float32, device=DEVICE)
    return s


@pytest.mark.parametrize("bs,chunk,H,Hkv,d,dtype,kv_dtype,k_scale,v_scale,bt_dtype", ATTN_CASES)
def test_paged_attention_mixed_batch(bs, chunk, H, Hkv, d, dtype, kv_dtype, k_scale, v_scale, bt_dtype):
    q_lens, seq_lens = (MIXED_Q, MIXED_S) if bs == 16 else (MIXED_Q_128, MIXED_S_128)
    batch = Batch(q_lens, seq_lens, bs=bs, chunk=chunk, H=H, Hkv=Hkv, d=d, dtype=dtype, kv_dtype=kv_dtype,
                  k_scale=_scale(k_scale), v_scale=_scale(v_scale), bt_dtype=bt_dtype)
    if chunk is not None:   # the case really frees blocks, and a prefill's queries span two chunks
        assert (batch.table[3] == -1).any()
        assert window_start(seq_lens[4] - q_lens[4], chunk) != window_start(seq_lens[4] - 1, chunk)
    q, kc, vc, bt, qsl, sl = batch.dev()
    out = torch.full_like(q, float("nan"))
    res = paged_attention(q, kc, vc, bt, qsl, sl, max_query_len=max(q_lens), out=out, **batch.kwargs())
    assert res is out
    tol = (FP8_TOL if kv_dtype == FP8 else TOL)[dtype]
    assert_close(out, dense_ref(batch), tol)


DECODE_CASES = [
    # bs, chunk, H, Hkv, d, dtype, kv_dtype
    pytest.param(16, 24, 4, 2, 32, torch.float32, None, id="bs16-chunk24-fp32"),
    pytest.param(128, None, 8, 1, 16, torch.float16, None, id="bs128-global-gqa8-fp16"),
    pytest.param(16, None, 5, 1, 16, torch.float32, FP8, id="bs16-global-gqa5-fp8"),
]


@pytest.mark.parametrize("bs,chunk,H,Hkv,d,dtype,kv_dtype", DECODE_CASES)
def test_paged_decode_splits(bs, chunk, H, Hkv, d, dtype, kv_dtype):
    seq_lens = [1, 17, 40, 150, 33]          # seq_len 1: most splits are empty
    fp8 = kv_dtype == FP8
    batch = Batch([1] * len(seq_lens), seq_lens, bs=bs, chunk=chunk, H=H, Hkv=Hkv, d=d, dtype=dtype,
                  kv_dtype=kv_dtype, k_scale=0.05 if fp8 else 1.0, v_scale=0.03 if fp8 else 1.0, seed=1)
    q, kc, vc, bt, qsl, sl = batch.dev()
    kw = batch.kwargs()
    tol = (FP8_TOL if fp8 else TOL)[dtype]
    ref = dense_ref(batch)
    full = paged_attention(q, kc, vc, bt, qsl, sl, max_query_len=1, **kw)
    assert_close(full, ref, tol)
    for splits in (1, 3, None):
        dec = paged_decode(q, kc, vc, bt, sl, num_splits=splits, **kw)
        assert dec.shape == q.shape
        assert_close(dec, ref, tol)
        assert_close(dec, full.cpu().double(), tol)


def test_paged_decode_matches_decode_attention_ref():
    """Against herd's own batched decode reference (finite fill: it reads padded slots, masked)."""
    seq_lens = [5, 30, 61, 24]
    batch = Batch([1] * 4, seq_lens, bs=16, chunk=24, H=4, Hkv=2, d=16, dtype=torch.float32, fill=0.0, seed=2)
    q, kc, vc, bt, qsl, sl = batch.dev()
    ref = decode_attention_ref(q, sl.long() - 1, bt.long(), kc, vc, 16, 24, batch.scale)
    # strided views: q sliced out of a wider (qkv-like) tensor, a column-major block table
    q_view = torch.cat([q, torch.randn_like(q)], dim=1)[:, : q.shape[1]]
    bt_view = bt.t().contiguous().t()
    assert not q_view.is_contiguous() and bt_view.stride(1) != 1
    out = paged_decode(q_view, kc, vc, bt_view, sl, num_splits=2, **batch.kwargs())
    assert_close(out, ref.cpu(), TOL[torch.float32])
    qsl_dec = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    out = paged_attention(q_view, kc, vc, bt_view, qsl_dec, sl, max_query_len=1, **batch.kwargs())
    assert_close(out, ref.cpu(), TOL[torch.float32])


@pytest.mark.parametrize("kv_dtype", [torch.float32, FP8], ids=["fp32", "fp8"])
def test_pipeline_matches_paged_attention_ref(kv_dtype):
    """reshape_and_cache + paged_attention == herd.ops.attention.paged_attention_ref (which stores
    the step's K/V with store_kv and attends): same outputs, same cache contents."""
    bs, chunk, H, Hkv, d = 16, 24, 4, 2, 16
    q_lens, seq_lens = MIXED_Q, MIXED_S
    fp8 = kv_dtype == FP8
    k_scale, v_scale = (0.05, 0.03) if fp8 else (1.0, 1.0)
    batch = Batch(q_lens, seq_lens, bs=bs, chunk=chunk, H=H, Hkv=Hkv, d=d, dtype=torch.float32,
                  kv_dtype=kv_dtype, k_scale=k_scale, v_scale=v_scale, fill=0.0, seed=3)
    # This step's tokens: fresh K/V for each sequence's last q_len positions (not yet in the cache
    # for the kernel path: those slots are reset to 0 first).
    g = torch.Generator().manual_seed(4)
    positions = torch.cat([torch.arange(s - ql, s) for ql, s in zip(q_lens, seq_lens)])
    slot_mapping = torch.cat([batch.slots(b, range(s - ql, s)) for b, (ql, s) in enumerate(zip(q_lens, seq_lens))])
    T = len(positions)
    k_new = torch.randn(T, Hkv, d, generator=g)
    v_new = torch.randn(T, Hkv, d, generator=g)
    live = slot_mapping >= 0
    batch.k_cache.view(-1, Hkv, d)[slot_mapping[live]] = 0
    batch.v_cache.view(-1, Hkv, d)[slot_mapping[live]] = 0

    q, kc, vc, bt, qsl, sl = batch.dev()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = paged_attention_ref(q, k_new.to(DEVICE), v_new.to(DEVICE), positions.to(DEVICE), batch.qsl.tolist(),
                              seq_lens, bt.long(), slot_mapping.to(DEVICE), kc_ref, vc_ref, bs, chunk, batch.scale,
                              k_scale, v_scale)

    reshape_and_cache(k_new.to(DEVICE), v_new.to(DEVICE), kc, vc, slot_mapping.to(DEVICE), k_scale, v_scale)
    out = paged_attention(q, kc, vc, bt, qsl, sl, max_query_len=max(q_lens), **batch.kwargs())
    # fp8: the reference dequantizes to q's dtype exactly as the kernel's folded scales do (fp32 q)
    assert_close(out, ref.cpu(), (FP8_TOL if fp8 else TOL)[torch.float32])
    assert torch.equal(kc.view(torch.uint8), kc_ref.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8))


@pytest.mark.parametrize("kv_dtype,k_scale,v_scale", [
    pytest.param(torch.float16, 1.0, 1.0, id="fp16"),
    pytest.param(FP8, 0.02, 0.5, id="fp8-float-scales"),
    pytest.param(FP8, "tensor:0.013", "tensor:3.0", id="fp8-tensor-scales"),
])
def test_reshape_and_cache_matches_store_kv(kv_dtype, k_scale, v_scale):
    g = torch.Generator().manual_seed(5)
    num_blocks, bs, Hkv, d, T = 4, 16, 3, 24, 9          # odd Hkv / head_dim exercise the masks
    k = (torch.randn(T, Hkv, d, generator=g) * 4).half()
    v = (torch.randn(T, Hkv, d, generator=g) * 400).half()   # some values saturate at +-448 in fp8
    slots = torch.tensor([3, -1, 17, 63, -1, 0, 40, 41, 5], dtype=torch.int64)
    ref_k = torch.zeros(num_blocks, bs, Hkv, d).to(kv_dtype)
    ref_v = torch.zeros(num_blocks, bs, Hkv, d).to(kv_dtype)
    kc, vc = ref_k.clone().to(DEVICE), ref_v.clone().to(DEVICE)
    ks, vs = _scale(k_scale), _scale(v_scale)
    store_kv(k, v, ref_k, ref_v, slots, float(ks) if torch.is_tensor(ks) else ks,
             float(vs) if torch.is_tensor(vs) else vs)
    reshape_and_cache(k.to(DEVICE), v.to(DEVICE), kc, vc, slots.to(DEVICE), ks, vs)
    assert torch.equal(kc.cpu().view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(vc.cpu().view(torch.uint8), ref_v.view(torch.uint8))


def test_fp8_kv_quotients_are_correctly_rounded_on_every_path():
    """bf16 0.75 / fp32(0.015) rounds to exactly 50.0, an e4m3 tie (48 | 52) that goes to the
    even 48; multiplying by the reciprocal instead (torch's CUDA path for a Python-scalar divisor)
    gives 50.000004 -> 52. The reference store, the sdpa backend's quantizer and the Triton cache
    kernel must all store the correctly rounded quotient, whatever type the scale has."""
    import numpy as np

    from herd.ops.attention import quantize_kv

    scale = 0.015
    x = torch.tensor([0.75, -0.75, 0.375, 1.5, 0.7734375, 3.0], dtype=torch.bfloat16)
    quot = np.float32(x.float().numpy()) / np.float32(scale)           # numpy: IEEE fp32 division
    want = torch.from_numpy(np.clip(quot, -448, 448)).to(FP8).view(torch.uint8)
    assert want[0] == torch.tensor(48.0).to(FP8).view(torch.uint8)     # the tie went to even
    rows = x.view(-1, 1, 1).expand(-1, 1, 2).contiguous().to(DEVICE)   # [T, Hkv=1, d=2]
    for s in (scale, torch.tensor([scale], device=DEVICE), torch.tensor(scale)):
        got = quantize_kv(rows, s, FP8).view(torch.uint8)[:, 0, 0].cpu()
        assert torch.equal(got, want), s
        slots = torch.arange(len(x), dtype=torch.int64, device=DEVICE)
        kc = torch.zeros(1, 16, 1, 2, device=DEVICE).to(FP8)
        vc = torch.zeros_like(kc)
        store_kv(rows, rows, kc, vc, slots, s, s)
        assert torch.equal(kc.view(torch.uint8)[0, :len(x), 0, 0].cpu(), want), s
        kt, vt = torch.zeros_like(kc), torch.zeros_like(vc)
        reshape_and_cache(rows, rows, kt, vt, slots, s if not torch.is_tensor(s) else s.reshape(1).to(DEVICE),
                          s if not torch.is_tensor(s) else s.reshape(1).to(DEVICE))
        assert torch.equal(vt.view(torch.uint8)[0, :len(x), 0, 0].cpu(), want), s
