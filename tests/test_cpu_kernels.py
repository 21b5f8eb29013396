"""herd's C kernels for the CPU (herd/ops/cpu) against their torch references: torch._grouped_mm
for the grouped expert GEMM, F.linear for the dense one, on shapes that reach every code path
(one or many rows per expert: streaming panels and register tiles; K not a multiple of the
8-row step; panel widths that do not divide N; idle experts; rows past offs[-1])."""
import pytest
import torch
import torch.nn.functional as F

import herd.ops.moe as moe
from herd.ops.cpu import (CPU_LINEAR_MAX_ROWS, cpu_grouped_gemm_supported, cpu_linear_supported, k_major,
                          k_major_stride, kernels_available)
from herd.ops.cpu.build import load_library

TOL = dict(atol=1e-4, rtol=1e-4)


def grouped_ref(a, w, offs):
    """torch._grouped_mm's contract as a loop (torch's kernel needs 16-byte row strides)."""
    out = torch.zeros(a.shape[0], w.shape[1])
    lo = 0
    for e, hi in enumerate(offs.tolist()):
        out[lo:hi] = F.linear(a[lo:hi], w[e])
        lo = hi
    return out


def dense_k_major(w: torch.Tensor) -> torch.Tensor:
    """K-major without the loader's row padding (k_major: what the loader stores)."""
    return w.transpose(-2, -1).contiguous().transpose(-2, -1)


def test_k_rows_are_padded_to_an_odd_number_of_cache_lines():
    assert k_major_stride(2048, 4) == 2064 and k_major_stride(2048, 2) == 2080   # 128 / 64 lines -> one more
    assert k_major_stride(1040, 4) == 1040 and k_major_stride(960, 4) == 976     # 65 lines kept; 60 -> 61
    assert k_major_stride(8, 4) == 16 and k_major_stride(24, 4) == 48             # whole lines, odd counts
    w = torch.randn(3, 2048, 40)
    kw = k_major(w)
    assert kw.stride() == (40 * 2064, 1, 2064) and torch.equal(kw, w)


@pytest.mark.parametrize("rows", [1, 3, 16, 64])
def test_kernels_take_any_k_row_stride(rows):
    """The same products from the loader's padded K rows and from dense K-major ones."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g)
    w = torch.randn(1024, 96, generator=g) * 96 ** -0.5
    padded, dense = k_major(w), dense_k_major(w)
    assert padded.stride(1) != dense.stride(1)
    out = torch.ops.herd.cpu_linear(x, padded)
    torch.testing.assert_close(out, F.linear(x, w), **TOL)
    torch.testing.assert_close(torch.ops.herd.cpu_linear(x, dense), out, atol=0, rtol=0)


def test_kernels_build_here():
    """The machines herd runs its CPU path on have a C compiler (torch.compile needs one too)."""
    assert load_library() is not None and kernels_available()


def grouped_inputs(M, E, N, K, seed, idle=(), tail=0):
    g = torch.Generator().manual_seed(seed)
    experts = [e for e in range(E) if e not in idle]
    ids = torch.tensor(experts)[torch.randint(0, len(experts), (M - tail,), generator=g)]
    counts = torch.bincount(ids, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    a = torch.randn(M, K, generator=g)
    w = k_major(torch.randn(E, N, K, generator=g) * K ** -0.5)
    return a, w, offs


@pytest.mark.parametrize("M,E,N,K", [
    (1, 1, 16, 8), (3, 4, 64, 7), (16, 16, 2048, 64), (40, 3, 80, 100), (64, 2, 576, 24),
    (130, 5, 1040, 33), (7, 8, 512, 512), (20, 2, 64, 40), (45, 1, 1072, 2048), (45, 1, 1072, 2049)])
def test_grouped_gemm_matches_torch(M, E, N, K):
    """Shapes reaching each path: one-row panels, panels + register tiles, and the strips of 5+
    rows (16-, 32- and 48-column strips, partial 8-row blocks, K at and past the strips' limit)."""
    a, w, offs = grouped_inputs(M, E, N, K, seed=M + N)
    assert cpu_grouped_gemm_supported(a.dtype, w)
    out = torch.ops.herd.cpu_grouped_gemm(a, w, offs)
    torch.testing.assert_close(out, grouped_ref(a, w, offs), **TOL)
    if K % 4 == 0:
        torch.testing.assert_close(out, torch._grouped_mm(a, w.transpose(-2, -1), offs=offs), **TOL)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M,E,N,K", [
    (1, 1, 576, 576), (4, 1, 960, 1025), (1, 1, 12304, 200), (6, 1, 2048, 64), (16, 16, 2048, 512),
    (8, 4, 4096, 131), (2, 8, 16, 4000)])
def test_split_k_matches_torch(M, E, N, K, threads):
    """Every expert with at most 6 rows and K >= 64: split-K over blocks of whole K rows (one
    column panel where rows x N fits the partial sums' limit of 6,144 floats, several with a
    narrower last one where not; K-ranges with a short last one, K not a multiple of the 8-row
    step), for 1-3 threads (the chunk count follows the thread count), fp32 and bf16."""
    a, w, offs = grouped_inputs(M, E, N, K, seed=M * K + N)
    counts = offs.diff(prepend=offs.new_zeros(1))
    assert 0 < int(counts.max()) <= 6 and K >= 64
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.herd.cpu_grouped_gemm(a, w, offs)
        out16 = torch.ops.herd.cpu_grouped_gemm(a.bfloat16(), k_major(w.bfloat16()), offs)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, grouped_ref(a, w, offs), **TOL)
    assert_bf16_rounding_of(out16, grouped_ref(a.bfloat16().float(), w.bfloat16().float(), offs))


def test_grouped_gemm_idle_experts_and_rows_past_the_end():
    """Experts with no rows are skipped; rows past offs[-1] (pairs of other EP ranks) are not
    computed, and the ones before them are right."""
    a, w, offs = grouped_inputs(29, 6, 96, 40, seed=7, idle=(0, 3, 5), tail=4)
    assert int(offs[-1]) == 25
    out = torch.ops.herd.cpu_grouped_gemm(a, w, offs)
    ref = torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
    torch.testing.assert_close(out[:25], ref[:25], **TOL)


def test_grouped_gemm_takes_strided_rows():
    a, w, offs = grouped_inputs(9, 3, 32, 24, seed=2)
    wide = torch.randn(9, 40)
    wide[:, 5:29] = a
    out = torch.ops.herd.cpu_grouped_gemm(wide[:, 5:29], w, offs)
    torch.testing.assert_close(out, torch._grouped_mm(a, w.transpose(-2, -1), offs=offs), **TOL)


def test_supported_only_for_what_the_kernel_reads():
    w = k_major(torch.randn(2, 32, 16))
    assert cpu_grouped_gemm_supported(torch.float32, w)
    assert not cpu_grouped_gemm_supported(torch.float32, w.contiguous())      # row-major
    assert cpu_grouped_gemm_supported(torch.float32, dense_k_major(w))         # any K row stride
    assert cpu_grouped_gemm_supported(torch.bfloat16, w.bfloat16())            # bf16 too
    assert not cpu_grouped_gemm_supported(torch.float32, w.bfloat16())         # one type for both
    assert not cpu_grouped_gemm_supported(torch.float16, w.half())             # fp32 and bf16 only
    assert not cpu_grouped_gemm_supported(torch.float32, k_major(torch.randn(2, 24, 16)))  # N % 16
    x = torch.randn(CPU_LINEAR_MAX_ROWS, 16)
    assert cpu_linear_supported(x, w[0]) and not cpu_linear_supported(torch.randn(CPU_LINEAR_MAX_ROWS + 1, 16), w[0])


@pytest.mark.parametrize("rows", [1, 5, 13, CPU_LINEAR_MAX_ROWS])
@pytest.mark.parametrize("N,K", [(576, 576), (48, 1536), (4096, 64)])
def test_linear_matches_f_linear(rows, N, K):
    g = torch.Generator().manual_seed(rows * N)
    x = torch.randn(rows, K, generator=g)
    w = k_major(torch.randn(N, K, generator=g) * K ** -0.5)
    torch.testing.assert_close(torch.ops.herd.cpu_linear(x, w), F.linear(x, w), **TOL)


def assert_bf16_rounding_of(out, ref):
    """`out` (bf16) is the fp32 result `ref` rounded once: within half a bf16 step (plus fp32
    summation-order noise), and equal to ref.bfloat16() but where the sum sits on a rounding edge."""
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -8, atol=1e-5)
    assert (out == ref.bfloat16()).float().mean() > 0.99


@pytest.mark.parametrize("M,E,N,K", [(1, 1, 16, 8), (3, 4, 64, 7), (40, 3, 80, 100), (130, 5, 1040, 33)])
def test_grouped_gemm_bf16(M, E, N, K):
    """bf16 activations and weights widen exactly to fp32; the fp32 sums round once."""
    a, w, offs = grouped_inputs(M, E, N, K, seed=M + N)
    a, w = a.bfloat16(), k_major(w.bfloat16())
    assert w.stride(-2) == 1 and cpu_grouped_gemm_supported(a.dtype, w)
    assert_bf16_rounding_of(torch.ops.herd.cpu_grouped_gemm(a, w, offs), grouped_ref(a.float(), w.float(), offs))


@pytest.mark.parametrize("rows", [1, 7, CPU_LINEAR_MAX_ROWS])
def test_linear_bf16(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g).bfloat16()
    w = k_major((torch.randn(1536, 576, generator=g) * 576 ** -0.5).bfloat16())
    out = torch.ops.herd.cpu_linear(x, w)
    assert_bf16_rounding_of(out, F.linear(x.float(), w.float()))
    # as close to the fp32 result as torch's own bf16 GEMM
    ref = F.linear(x.float(), w.float())
    assert (out.float() - ref).abs().max() <= 1.01 * (F.linear(x, w).float() - ref).abs().max()


def test_linear_keeps_leading_dims():
    x = torch.randn(2, 3, 32)
    w = k_major(torch.randn(64, 32))
    out = torch.ops.herd.cpu_linear(x, w)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, F.linear(x, w), **TOL)


def test_ops_compile_fullgraph():
    """Custom ops with fake kernels: a compiled graph calls them, no graph break."""
    a, w, offs = grouped_inputs(12, 4, 64, 32, seed=5)
    lin = k_major(torch.randn(48, 64))

    def f(a, offs):
        return torch.ops.herd.cpu_linear(torch.ops.herd.cpu_grouped_gemm(a, w, offs).relu(), lin)

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a, offs)
    torch.testing.assert_close(out, F.linear(torch._grouped_mm(a, w.transpose(-2, -1), offs=offs).relu(), lin), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_uses_the_kernel_and_matches_the_reference(monkeypatch, dtype):
    """fp32 and bf16 K-major experts go through herd's kernel (eager and compiled), equal to the
    loop (bf16: to the loop in fp32 on the same bf16 values, within bf16 rounding)."""
    g = torch.Generator().manual_seed(11)
    T, D, I, E = 17, 64, 48, 6
    x = torch.randn(T, D, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=g) * D ** -0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) * I ** -0.5).to(dtype)
    ids = torch.randint(0, E, (T, 2), generator=g)
    wts = torch.rand(T, 2, generator=g)
    ref = moe.fused_moe_ref(x.float(), w13.float(), w2.float(), ids, wts)
    tol = TOL if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    k13, k2 = k_major(w13), k_major(w2)
    torch.testing.assert_close(moe.fused_moe(x, k13, k2, ids, wts).float(), ref, **tol)
    torch._dynamo.reset()
    compiled = torch.compile(moe.fused_moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, k13, k2, ids, wts).float(), ref, **tol)
    assert calls == []   # torch's grouped GEMM never ran


def paged_ref(q, k_cache, v_cache, phys, mask, scale):
    """The sdpa backend's decode: gather each window, one masked SDPA."""
    kb = k_cache[phys].flatten(1, 2).transpose(1, 2)
    vb = v_cache[phys].flatten(1, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None, :], kb, vb, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k_cache.shape[2])[:, :, 0, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,D,bs,W", [(1, 4, 4, 16, 16, 1), (5, 8, 2, 64, 16, 3), (3, 6, 2, 32, 128, 2),
                                            (7, 5, 1, 128, 4, 9), (1, 9, 3, 64, 128, 3), (2, 40, 8, 128, 16, 5)])
def test_paged_decode_matches_sdpa(B, H, Hkv, D, bs, W, dtype):
    """Windows start inside a block (chunked-local layers) and end at each sequence's own length;
    padded blocks point at block 0 and are masked; blocks are scattered in the cache. A bf16
    query and cache are computed in fp32 (each value widens exactly) and the output rounded once
    to bf16: the fp32 reference on the same bf16 values, rounded, within a bf16 step."""
    from herd.ops.cpu import cpu_paged_decode_supported
    g = torch.Generator().manual_seed(B * 100 + D)
    nb = B * W + 3
    k_cache, v_cache = torch.randn(2, nb, bs, Hkv, D, generator=g).unbind(0)
    q = torch.randn(B, H, D, generator=g)
    phys = torch.randperm(nb, generator=g)[:B * W].view(B, W)
    L = W * bs
    lens = torch.randint(1, L + 1, (B,), generator=g)
    starts = torch.stack([torch.randint(0, int(n), (1,), generator=g)[0] for n in lens])
    pos = torch.arange(L)[None, :]
    mask = (pos < lens[:, None]) & (pos >= starts[:, None])
    used = (lens + bs - 1) // bs
    phys = torch.where(torch.arange(W)[None, :] < used[:, None], phys, 0)   # padding -> block 0
    mask = mask[:, None, None, :]
    q, k_cache, v_cache = (t.to(dtype) for t in (q, k_cache, v_cache))
    assert cpu_paged_decode_supported(q, k_cache)
    assert not cpu_paged_decode_supported(q.float() if dtype == torch.bfloat16 else q.bfloat16(), k_cache)
    out = torch.ops.herd.cpu_paged_decode(q, k_cache, v_cache, phys, mask, D ** -0.5)
    ref = paged_ref(q.float(), k_cache.float(), v_cache.float(), phys, mask, D ** -0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **TOL)
    else:
        assert_bf16_rounding_of(out, ref)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_paged_decode_splits_windows_with_empty_parts(threads):
    """Batch 1 cuts the window into splits combined afterwards (flash-decoding): splits with no
    visible key (a chunked layer's window starting late, blocks past the sequence) add nothing;
    a sequence with no visible key at all gives zeros, as the reference's empty softmax would not."""
    g = torch.Generator().manual_seed(threads)
    B, H, Hkv, D, bs, W = 3, 6, 2, 32, 16, 24
    k_cache, v_cache = torch.randn(2, B * W + 1, bs, Hkv, D, generator=g).unbind(0)
    q = torch.randn(B, H, D, generator=g)
    phys = torch.arange(1, B * W + 1).view(B, W)
    pos = torch.arange(W * bs)
    mask = torch.stack([(pos >= 300) & (pos < 309), pos == 5, torch.zeros_like(pos, dtype=torch.bool)])
    mask = mask[:, None, None, :]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.herd.cpu_paged_decode(q, k_cache, v_cache, phys, mask, D ** -0.5)
    finally:
        torch.set_num_threads(old)
    ref = paged_ref(q[:2], k_cache, v_cache, phys[:2], mask[:2], D ** -0.5)
    torch.testing.assert_close(out[:2], ref, **TOL)
    assert torch.equal(out[2], torch.zeros(H, D))


def test_paged_decode_compiles_with_a_dynamic_window():
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(2, 12, 16, 2, 32, generator=g).unbind(0)
    q = torch.randn(4, 4, 32, generator=g)
    fn = torch.compile(lambda q, p, m: torch.ops.herd.cpu_paged_decode(q, k_cache, v_cache, p, m, 0.2),
                       fullgraph=True, backend="aot_eager", dynamic=True)
    torch._dynamo.reset()
    for W in (2, 3):
        phys = torch.randint(0, 12, (4, W), generator=g)
        mask = torch.ones(4, 1, 1, W * 16, dtype=torch.bool)
        mask[:, ..., :5] = False
        torch.testing.assert_close(fn(q, phys, mask), paged_ref(q, k_cache, v_cache, phys, mask, 0.2), **TOL)


def test_loaded_model_runs_on_the_kernels_and_matches_torch(scout_dir, monkeypatch):
    """load_model on the CPU stores fp32 linear and expert weights K-major (embeddings keep their
    rows); a forward of decode-sized rows then runs the kernels, and equals the forward with the
    kernels switched off (F.linear and torch's grouped GEMM on the same weights)."""
    import herd.ops.cpu as cpu
    from herd.model.layers import LinearBase, ParallelLMHead, VocabParallelEmbedding
    from herd.model.loader import load_model

    built = []
    monkeypatch.setattr(cpu, "kernels_available", lambda f=cpu.kernels_available: built.append(f()) or built[-1])
    model = load_model(scout_dir, dtype=torch.float32)
    assert built == [True]  # the kernels are built (or found) while loading, before the first step
    monkeypatch.undo()
    # bf16: the experts K-major for the kernel, dense linears row-major for torch's bf16 GEMM
    bf16 = load_model(scout_dir, dtype=torch.bfloat16)
    experts = [m for m in bf16.modules() if type(m).__name__ == "FusedMoE"]
    assert experts and all(m.w13_weight.stride(-2) == 1 and cpu_grouped_gemm_supported(torch.bfloat16, m.w2_weight)
                           for m in experts)
    assert all(w.stride(-1) == k_major_stride(w.shape[-2], 2) for m in experts for w in (m.w13_weight, m.w2_weight))
    assert all(m.weight.is_contiguous() for m in bf16.modules() if isinstance(m, (LinearBase, ParallelLMHead)))
    del bf16
    linears = [m for m in model.modules() if isinstance(m, (LinearBase, ParallelLMHead))]
    assert linears and all(m.weight.stride(0) == 1 and m.weight.stride(1) == k_major_stride(m.weight.shape[0], 4)
                           for m in linears)
    embeds = [m for m in model.modules() if type(m) is VocabParallelEmbedding]
    assert embeds and all(m.weight.is_contiguous() for m in embeds)

    import herd.model.layers as layers
    ids = torch.randint(3, 320, (24,), generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(layers, "cpu_linear_supported",
                        lambda x, w, f=cpu.cpu_linear_supported: calls.append((f(x, w), w.shape[0] % 16 == 0)) or calls[-1][0])
    with torch.no_grad():
        fast = model.compute_logits(model(ids, torch.arange(24)))
    assert any(used for used, _ in calls) and all(used == aligned for used, aligned in calls)  # all but N % 16 != 0
    monkeypatch.setattr(cpu, "kernels_available", lambda: False)
    calls.clear()
    with torch.no_grad():
        ref = model.compute_logits(model(ids, torch.arange(24)))
    assert calls and not any(used for used, _ in calls)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_without_a_working_compiler_torch_paths_run(monkeypatch, tmp_path, caplog):
    """A compiler that fails (or none at all): one warning, the kernels report unsupported, and
    the MoE runs on torch's grouped GEMM, equal to its reference."""
    import herd.ops.cpu.build as build
    monkeypatch.setenv("HERD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(build.shutil, "which", lambda cc: "/bin/false" if cc == "false" else None)
    build.load_library.cache_clear()
    try:
        assert build.load_library() is None
        assert "herd CPU kernels unavailable" in caplog.text
        w13, w2 = k_major(torch.randn(3, 64, 32)), k_major(torch.randn(3, 32, 32))
        assert not cpu_grouped_gemm_supported(torch.float32, w13)
        x, ids, wts = torch.randn(5, 32), torch.randint(0, 3, (5, 1)), torch.rand(5, 1)
        torch.testing.assert_close(moe.fused_moe(x, w13, w2, ids, wts), moe.fused_moe_ref(x, w13, w2, ids, wts), **TOL)
        monkeypatch.setattr(build, "_compiler", lambda: None)
        build.load_library.cache_clear()
        assert build.load_library() is None
    finally:
        build.load_library.cache_clear()


def test_prefill_sized_experts_with_unaligned_rows_stay_on_the_kernel():
    """Above CPU_KERNEL_MAX_ROWS_PER_EXPERT rows per expert eager MoE goes to torch's grouped GEMM,
    which needs 16-byte rows; a hidden size that is not a multiple of 4 keeps the kernel instead of
    failing."""
    g = torch.Generator().manual_seed(8)
    D, N, E = 22, 64, 2
    T = moe.CPU_KERNEL_MAX_ROWS_PER_EXPERT[torch.float32] * E + 24
    a = torch.randn(T, D, generator=g)
    w = k_major(torch.randn(E, N, D, generator=g) * D ** -0.5)
    offs = torch.bincount(torch.randint(0, E, (T,), generator=g), minlength=E).cumsum(0).to(torch.int32)
    assert T > moe.CPU_KERNEL_MAX_ROWS_PER_EXPERT[torch.float32] * E and cpu_grouped_gemm_supported(a.dtype, w)
    torch.testing.assert_close(moe.grouped_gemm(a, w, offs), grouped_ref(a, w, offs), **TOL)


def test_build_from_another_folder_gives_the_same_kernels(tmp_path):
    """build_from (benchmarks/cpu_kernels_ab.py's baseline build) compiles the sources of a folder
    into a library with the same entry points; from these sources it computes what the cached
    library does."""
    import shutil

    from herd.ops.cpu import build

    for p in build.SOURCES + build.HEADERS:
        shutil.copy(p, tmp_path / p.name)
    lib = build.build_from(tmp_path, tmp_path / "copy.so")
    a, w, offs = grouped_inputs(5, 3, 256, 96, seed=3)
    out = torch.empty(5, 256)
    assert lib.herd_grouped_gemm_f32(a.data_ptr(), 96, w.data_ptr(), w.stride(0), w.stride(2), out.data_ptr(), 256,
                                     offs.data_ptr(), 3, 256, 96, 2) == 0
    torch.testing.assert_close(out, torch.ops.herd.cpu_grouped_gemm(a, w, offs), atol=0, rtol=0)
    assert lib.herd_grouped_gemm_f32(a.data_ptr(), 96, w.data_ptr(), w.stride(0), w.stride(2), out.data_ptr(), 256,
                                     offs.data_ptr(), 3, 250, 96, 2) == -1   # N % 16 != 0 is refused


@pytest.mark.parametrize("N,K", [(576, 576), (963, 100), (4096, 31), (8, 1536)])
def test_row_major_bf16_linear_matches_f_linear(N, K):
    """bf16 dense linears stay row-major; at decode rows cpu_linear streams whole weight rows (on
    the bf16 dot-product instruction where the CPU has one: exact products, fp32 sums) and rounds
    once to bf16. N not a multiple of the 4-row groups, K not a multiple of the 32-element step."""
    from herd.ops.cpu import gemv_rm_bf16_max_rows

    most = gemv_rm_bf16_max_rows()
    assert most >= 1
    g = torch.Generator().manual_seed(N + K)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).bfloat16()
    for rows in range(1, most + 1):
        x = torch.randn(rows, K, generator=g).bfloat16()
        assert cpu_linear_supported(x, w)
        assert_bf16_rounding_of(torch.ops.herd.cpu_linear(x, w), F.linear(x.float(), w.float()))
    assert not cpu_linear_supported(torch.randn(most + 1, K).bfloat16(), w)   # torch's GEMM from there
    assert not cpu_linear_supported(torch.randn(1, K), w.float())             # fp32 weights go K-major
    if N == 576:   # the dispatch traces: no graph break in a compiled decode step
        torch._dynamo.reset()
        fn = torch.compile(lambda x: torch.ops.herd.cpu_linear(x, w) if cpu_linear_supported(x, w) else None,
                           fullgraph=True, backend="aot_eager")
        x = torch.randn(1, K).bfloat16()
        torch.testing.assert_close(fn(x), torch.ops.herd.cpu_linear(x, w), atol=0, rtol=0)


def test_row_major_kernel_body_in_fp32():
    """The portable row-major loop (what bf16 runs on CPUs without the dot-product instruction),
    built for fp32 as well, against F.linear through the C entry point."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 70, generator=g), torch.randn(37, 70, generator=g)
    out = torch.empty(3, 37)
    assert load_library().herd_gemv_rm_f32(x.data_ptr(), 70, w.data_ptr(), 70, out.data_ptr(), 37, 3, 37, 70, 2) == 0
    torch.testing.assert_close(out, F.linear(x, w), **TOL)
