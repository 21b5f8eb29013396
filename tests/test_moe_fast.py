"""Grouped-GEMM MoE fast path (herd.ops.moe.fused_moe) against the per-expert reference loop."""
import pytest
import torch

import herd.ops.moe as moe
from herd.model.llama4 import FusedMoE, UnquantizedFusedMoEMethod
from herd.model.loader import load_model
from herd.ops.fp8 import FP8_DTYPE, quantize_weight
from herd.parallel.context import TPContext
import herd.quant.methods.fp8 as methods
from herd.quant.methods.fp8 import Fp8MoEMethod, _fp8_grouped_kind

REF = moe.fused_moe_ref
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _boom(*a, **k):
    raise AssertionError("fused_moe fell back to fused_moe_ref")


@pytest.fixture
def no_reference(monkeypatch):
    """Make sure the fast path really ran: fused_moe may not call into the reference loop."""
    monkeypatch.setattr(moe, "fused_moe_ref", _boom)


def make_inputs(T, D, I, E, k, dtype, seed=0, num_ids=None, used=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=g) * D ** -0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) * I ** -0.5).to(dtype)
    # `used`: the only experts that receive tokens (the others get none)
    pool = torch.tensor(used) if used is not None else torch.arange(num_ids or E)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    wts = torch.sigmoid(torch.randn(T, k, generator=g)).to(dtype)
    return x, w13, w2, ids, wts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("on_input", [True, False])
def test_fast_matches_reference(dtype, k, on_input, no_reference):
    x, w13, w2, ids, wts = make_inputs(19, 64, 32, 6, k, dtype, used=[0, 2, 3, 5])  # experts 1 and 4 idle
    fast = moe.fused_moe(x, w13, w2, ids, wts, apply_router_weight_on_input=on_input)
    ref = REF(x, w13, w2, ids, wts, apply_router_weight_on_input=on_input)
    assert fast.dtype == dtype and fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2])
def test_expert_parallel_map(dtype, k, no_reference):
    """8 global experts, this rank owns 2..4 (local 0..2); the rest are -1 and contribute nothing.
    Their rows land past offs[-1], where _grouped_mm leaves garbage: the output must stay finite."""
    emap = torch.full((8,), -1, dtype=torch.long)
    emap[2:5] = torch.arange(3)
    x, w13, w2, ids, wts = make_inputs(23, 32, 16, 3, k, dtype, seed=1, num_ids=8)
    fast = moe.fused_moe(x, w13, w2, ids, wts, expert_map=emap)
    ref = REF(x, w13, w2, ids, wts, expert_map=emap)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, **TOL[dtype])
    # a token whose experts are all remote gets exactly zero
    remote = (emap[ids] < 0).all(dim=-1)
    assert remote.any() and (fast[remote] == 0).all()


def test_all_pairs_remote_and_empty_batch(no_reference):
    emap = torch.tensor([-1, -1, 0, 1])
    x, w13, w2, _, wts = make_inputs(5, 16, 8, 2, 1, torch.float32)
    out = moe.fused_moe(x, w13, w2, torch.zeros(5, 1, dtype=torch.long), wts, expert_map=emap)
    assert (out == 0).all()
    empty = moe.fused_moe(x[:0], w13, w2, torch.zeros(0, 2, dtype=torch.long), wts[:0, :1].expand(0, 2))
    assert empty.shape == (0, 16)


def test_tensor_parallel_shards_sum_to_full(no_reference):
    """TP splits each expert's intermediate dim; the shard outputs add up to the unsharded result."""
    E, D, I, tp = 4, 64, 64, 4
    x, w13, w2, ids, wts = make_inputs(17, D, I, E, 2, torch.float32, seed=2)
    s = I // tp
    total = torch.zeros(17, D)
    for r in range(tp):
        gate, up = w13[:, r * s:(r + 1) * s], w13[:, I + r * s:I + (r + 1) * s]
        w13_r, w2_r = torch.cat([gate, up], dim=1).contiguous(), w2[:, :, r * s:(r + 1) * s].contiguous()
        part = moe.fused_moe(x, w13_r, w2_r, ids, wts)
        torch.testing.assert_close(part, REF(x, w13_r, w2_r, ids, wts), **TOL[torch.float32])
        total += part
    torch.testing.assert_close(total, REF(x, w13, w2, ids, wts), atol=1e-5, rtol=1e-5)


def test_unaligned_dims_fall_back_to_reference():
    """D = 6 fp32 values = 24-byte rows: not a multiple of 16 bytes, so the reference runs."""
    x, w13, w2, ids, wts = make_inputs(7, 6, 4, 3, 1, torch.float32)
    assert not moe.grouped_moe_supported(x, w13, w2)
    torch.testing.assert_close(moe.fused_moe(x, w13, w2, ids, wts), REF(x, w13, w2, ids, wts))


def test_weights_are_not_copied():
    """The transposed [E, K, N] weight views go to the kernel as they are."""
    x, w13, w2, ids, wts = make_inputs(9, 32, 16, 4, 1, torch.float32)
    assert moe.grouped_moe_supported(x, w13, w2)
    seen = []
    real = torch._grouped_mm

    def spy(a, b, offs=None, **kw):
        seen.append(b)
        return real(a, b, offs=offs, **kw)

    torch._grouped_mm = spy
    try:
        moe.fused_moe(x, w13, w2, ids, wts)
    finally:
        torch._grouped_mm = real
    assert [b.data_ptr() for b in seen] == [w13.data_ptr(), w2.data_ptr()]
    assert seen[0].stride() == (w13.stride(0), 1, w13.stride(1))


def test_routing_on_device():
    ids = torch.tensor([[3, 0], [1, 3], [0, 0], [5, 1]])
    emap = torch.tensor([0, 1, -1, 2, -1, -1])  # local experts: 0, 1, 3; 2, 4, 5 remote
    r = moe.moe_route(ids, torch.ones(4, 2), 3, emap)
    assert r.offs.dtype == torch.int32 and r.offs.tolist() == [3, 5, 7]
    assert r.expert.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]  # stable; the remote pair (5) last, sentinel 3
    assert r.token.tolist() == [0, 2, 2, 1, 3, 0, 1, 3]
    assert r.valid.tolist() == [True] * 7 + [False]
    # inverse: flat pair i = t * k + j sits at sorted row inverse[i]
    assert r.expert[r.inverse].tolist() == [2, 0, 1, 2, 0, 0, 3, 1]
    assert r.token[r.inverse].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# ---------------------------------------------------------------------------------------------
# torch.compile: fullgraph=True fails on any graph break, and a host sync (.item(), .tolist(),
# bool(t)) is a graph break. The grouped GEMM is compiled in bf16: torch._grouped_mm's fake-tensor
# (meta) kernel accepts bf16 only, so an fp32 _grouped_mm cannot be traced at all; fused_moe
# sees torch.compiler.is_compiling() and would take the reference for fp32. The fp32 routing and
# unpermutation are compiled on their own. The FP8 CPU path is left out for the same reason: it
# runs its grouped GEMM in fp32 to equal the dequantized fp32 reference.

@pytest.mark.parametrize("k", [1, 2])
def test_compiles_fullgraph_bf16(k, no_reference):
    emap = torch.tensor([1, -1, 0, 2, -1, 3])
    x, w13, w2, ids, wts = make_inputs(13, 64, 32, 4, k, torch.bfloat16, seed=3, num_ids=6)
    torch._dynamo.reset()
    fn = torch.compile(moe.fused_moe, fullgraph=True, backend="aot_eager")
    out = fn(x, w13, w2, ids, wts, expert_map=emap)
    torch.testing.assert_close(out, moe.fused_moe(x, w13, w2, ids, wts, expert_map=emap), atol=0, rtol=0)
    torch.testing.assert_close(out, REF(x, w13, w2, ids, wts, expert_map=emap), **TOL[torch.bfloat16])


def test_compiles_fullgraph_fp32_routing():
    emap = torch.tensor([1, -1, 0, 2, -1, 3])

    def route_and_back(y, ids, wts):
        r = moe.moe_route(ids, wts, 4, emap)
        return moe.moe_unpermute(y[r.token] * r.weight[:, None], r, ids.shape[0], ids.shape[1]), r.offs

    g = torch.Generator().manual_seed(4)
    y, ids, wts = torch.randn(11, 8, generator=g), torch.randint(0, 6, (11, 2), generator=g), torch.rand(11, 2)
    torch._dynamo.reset()
    out, offs = torch.compile(route_and_back, fullgraph=True, backend="aot_eager")(y, ids, wts)
    local = (emap[ids] >= 0).to(y.dtype) * wts
    torch.testing.assert_close(out, y * local.sum(dim=1, keepdim=True))
    assert offs.tolist() == torch.bincount(emap[ids][emap[ids] >= 0], minlength=4).cumsum(0).tolist()


def test_compiled_fp32_is_not_grouped():
    """Under compile an fp32 _grouped_mm cannot be traced (bf16-only meta), so fp32 is refused."""
    @torch.compile(fullgraph=True, backend="eager")
    def supported(x):
        return x + 1 if moe.grouped_mm_supported(torch.float32, x.device, 64, 64) else x - 1

    torch._dynamo.reset()
    assert supported(torch.zeros(1)).item() == -1
    assert moe.grouped_mm_supported(torch.float32, torch.device("cpu"), 64, 64)


# ---------------------------------------------------------------------------------------------
# FP8


def fp8_layer(static_input, ep_rank=None, dtype=torch.float32, E=6, D=64, I=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    tp = TPContext(rank=ep_rank, size=2) if ep_rank is not None else TPContext()
    layer = FusedMoE(E, D, I, dtype, tp, expert_parallel=ep_rank is not None,
                     quant_method=Fp8MoEMethod(from_checkpoint=static_input, static_input=static_input))
    El, Il = layer.num_local_experts, layer.inter_local
    w13 = torch.randn(El, 2 * Il, D, generator=g) * D ** -0.5
    w2 = torch.randn(El, D, Il, generator=g) * Il ** -0.5
    if static_input:  # a checkpoint: fp8 weights, per-channel scales, a different input scale per expert
        for name, w in (("w13", w13), ("w2", w2)):
            qs = [quantize_weight(w[e]) for e in range(El)]
            getattr(layer, f"{name}_weight").data.copy_(torch.stack([q for q, _ in qs]))
            getattr(layer, f"{name}_weight_scale").data.copy_(torch.stack([s for _, s in qs]))
        layer.w13_input_scale.data.copy_(torch.rand(E, generator=g) * 0.02 + 0.005)
        layer.w2_input_scale.data.copy_(torch.rand(E, generator=g) * 0.005 + 0.001)
    else:
        layer.w13_weight.data.copy_(w13.to(dtype))
        layer.w2_weight.data.copy_(w2.to(dtype))
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.w13_weight.dtype == FP8_DTYPE
    return layer


def fp8_fast_and_reference(layer, x, ids, wts, monkeypatch):
    method = layer.quant_method
    method.use_reference = True
    ref = layer(x, ids, wts)
    method.use_reference = False
    assert _fp8_grouped_kind(x, layer.hidden_size, layer.inter_local) == "dequant"
    for mod in (moe, methods):
        monkeypatch.setattr(mod, "fused_moe_ref", _boom)
    return layer(x, ids, wts), ref


@pytest.mark.parametrize("static_input", [False, True])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_fast_matches_fp8_reference(static_input, k, dtype, monkeypatch):
    layer = fp8_layer(static_input, dtype=dtype)
    x, _, _, ids, wts = make_inputs(21, 64, 32, 6, k, dtype, seed=6, used=[0, 1, 4, 5])
    fast, ref = fp8_fast_and_reference(layer, x, ids, wts, monkeypatch)
    # same quantized activations and dequantized operands; only the summation order may differ
    if dtype == torch.float32:
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    else:  # bf16 outputs: a rounding flip of an intermediate can move an FP8 code by one step
        torch.testing.assert_close(fast, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("static_input", [False, True])
def test_fp8_expert_parallel(static_input, monkeypatch):
    layer = fp8_layer(static_input, ep_rank=1)  # owns global experts 3..5
    assert layer.expert_map.tolist() == [-1, -1, -1, 0, 1, 2]
    x, _, _, ids, wts = make_inputs(25, 64, 32, 6, 2, torch.float32, seed=7)
    fast, ref = fp8_fast_and_reference(layer, x, ids, wts, monkeypatch)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)


def test_fp8_quantizes_activations_once_per_projection(monkeypatch):
    layer = fp8_layer(False)
    x, _, _, ids, wts = make_inputs(21, 64, 32, 6, 1, torch.float32, seed=8)
    calls = []
    real = methods.quantize_per_token
    monkeypatch.setattr(methods, "quantize_per_token", lambda a, *rest: calls.append(a.shape) or real(a, *rest))
    layer(x, ids, wts)
    assert calls == [(21, 64), (21, 32)]  # w13 input, w2 input: all experts at once


# ---------------------------------------------------------------------------------------------
# whole model


def _moe_methods(model):
    return [layer.feed_forward.experts.quant_method for layer in model.model.layers
            if hasattr(layer.feed_forward, "experts")]


def _logits(model, n=29):
    ids = torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(n)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama4_fast_equals_reference(scout_dir, dtype, monkeypatch):
    model = load_model(scout_dir, dtype=dtype)
    methods = _moe_methods(model)
    assert methods and all(isinstance(m, UnquantizedFusedMoEMethod) for m in methods)
    calls = []
    real = moe.fused_moe_ref
    monkeypatch.setattr(moe, "fused_moe_ref", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = _logits(model)
    assert not calls  # every MoE layer took the grouped path
    for m in methods:
        m.use_reference = True
    ref = _logits(model)
    assert len(calls) == len(methods)
    if dtype == torch.float32:
        assert (fast - ref).abs().max().item() <= 1e-5
    else:
        torch.testing.assert_close(fast, ref, atol=0.05, rtol=0.05)
        assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_tiny_llama4_online_fp8_fast_equals_reference(scout_dir):
    from herd.config import EngineConfig
    from herd.quant.methods import get_quant_methods
    cfg = EngineConfig.from_kwargs(scout_dir, dtype="float32", quantization="fp8")
    model = load_model(scout_dir, dtype=torch.float32, quant=get_quant_methods(cfg), config=cfg.model.hf_config)
    methods = _moe_methods(model)
    assert methods and all(isinstance(m, Fp8MoEMethod) for m in methods)
    fast = _logits(model)
    for m in methods:
        m.use_reference = True
    ref = _logits(model)
    assert (fast - ref).abs().max().item() <= 1e-4


class _Collector:
    """Stands in for INC's MeasurementCollector: keeps what _ObservedMoE reports."""

    def __init__(self):
        self.seen = {}

    def observe(self, node, kind, index, t):
        self.seen[kind, index] = t.detach().clone()

    def wants(self, node, kind):
        return True

    def observe_expert_amax(self, node, amax):
        self.seen["experts"] = amax.detach().clone()


@pytest.mark.parametrize("ep_rank", [None, 1])
def test_inc_measure_expert_amax_fast_equals_reference(ep_rank, monkeypatch):
    """INC MEASURE: the per-expert w2-input amax reduced on the device equals the loop's, idle
    experts (and other ranks' rows, uninitialized past offs[-1]) report 0."""
    from herd.quant.methods.inc import _ObservedMoE
    tp = TPContext(rank=ep_rank, size=2) if ep_rank is not None else TPContext()
    layer = FusedMoE(8, 64, 32, torch.float32, tp, expert_parallel=ep_rank is not None)
    x, w13, w2, ids, wts = make_inputs(21, 64, 32, layer.num_local_experts, 2, torch.float32, seed=9,
                                       used=[0, 1, 2, 5, 6])  # experts 3, 4 and 7 idle
    layer.w13_weight.data.copy_(w13)
    layer.w2_weight.data.copy_(w2)
    results = []
    for use_reference in (True, False):
        if not use_reference:
            monkeypatch.setattr(moe, "fused_moe_ref", _boom)
        collector = _Collector()
        out = _ObservedMoE(collector, "moe_op", tp, use_reference=use_reference).apply(layer, x, ids, wts)
        results.append((out, collector.seen["experts"]))
    (ref, ref_amax), (fast, fast_amax) = results
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_amax, ref_amax, atol=1e-6, rtol=1e-5)
    local_used = [e for e in range(layer.num_local_experts) if (layer.expert_map[ids] == e).any()
                  ] if ep_rank is not None else [0, 1, 2, 5, 6]
    assert (fast_amax > 0).tolist() == [e in local_used for e in range(layer.num_local_experts)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_major_cpu_layout_matches_reference(dtype, no_reference):
    """load_model stores CPU expert weights K-major (relayout_for_cpu): same values, other
    strides; the grouped path takes them as they are."""
    x, w13, w2, ids, wts = make_inputs(21, 64, 32, 6, 1, dtype, seed=3)
    k13, k2 = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w13, w2))
    assert k13.stride(-2) == 1 and torch.equal(k13, w13)
    fast = moe.fused_moe(x, k13, k2, ids, wts)
    torch.testing.assert_close(fast, REF(x, w13, w2, ids, wts), **TOL[dtype])
