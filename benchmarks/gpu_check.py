"""Every GPU check of herd in one command: kernel parity, CUDA-graph parity and Scout-shaped
throughput against the planner's roofline. Random weights only, nothing is downloaded; about
5-8 minutes on one H100 / H200.

    python benchmarks/gpu_check.py --out gpu_check.json

prints progress on stderr and ONE JSON line on stdout at the end (the same object is written to
--out, and rewritten after every section, so a run cut short keeps what it measured).

Each section runs in its own process (perf: one per precision), so an exception, a sticky CUDA
error, an OOM or a hang costs only that section: it is recorded as {"error": ...} next to what the
section had measured so far, and the next section runs. A global --budget-s (default 420 s) skips
what is left once it is spent (sections, kernel cases, perf runs); a section still running 60 s
past it is stopped, and killed at 120 s. --in-process runs everything in one process (debugging).

  env      torch / triton / CUDA versions, device name, capability, memory.
  kernels  Triton kernels vs herd's torch references (herd/ops/attention.py, herd/ops/moe.py):
           paged_attention on mixed prefill + decode batches (GQA 10/2, head_dim 128, block sizes
           16 and 128, chunked layers whose chunk boundary falls inside a block, global layers,
           bf16 / fp16, FP8 KV with float and tensor scales; freed (-1) and unused cache slots hold
           NaN, so any stray read shows up), paged_decode with 1, 4 and the default number of
           splits, reshape_and_cache (bit-exact against store_kv), fused_moe vs fused_moe_ref in
           bf16 and Fp8MoEMethod's grouped FP8 GEMM vs its per-expert reference; fp8-triton-*:
           herd's Triton FP8 expert GEMM vs torch's, each by its distance from the unquantized
           layer (8 draws); fp8_quant: the one-kernel per-token FP8 quantization vs its torch
           reference, bit for bit. Max abs error per case and pass / fail against tolerances.
  graphs   Greedy parity, eager (enforce_eager=True) vs CUDA graphs (enforce_eager=False, the
           default triton backend), tiny Scout-like and Maverick-like checkpoints in bf16 (fp32
           only where herd's grouped MoE GEMM takes it: on CUDA it is bf16-only, and its fp32
           fallback reads counts on the host, which a graph cannot capture); prompts of several
           lengths, 32 tokens, batch sizes 6 -> 8, 1 and 3 -> 4; checks the graphs were captured.
  perf     A Scout-shaped model (hidden 5120, 16 experts x 8192 + shared, top-1, 40/8 heads x 128,
           vocab 202048, chunked attention 8192 with NoPE every 4th layer) with as many layers as
           fit in 60% of the GPU's memory in BF16. Weights are random and made on the GPU
           (benchmarks/_gpu_models.random_weights patches the loader; no files). Decode tokens/s
           at batch 1, 16, 64, 256 (prompt 64, 128 tokens, greedy, ignore_eos; only steps in which
           every sequence decodes are timed; executor_ms_per_step is the share spent in the model
           runner, the rest is scheduling / detokenizing) and prefill tokens/s (16 x 1024 tokens in
           one step), in BF16 and online FP8 (quantization="fp8"), CUDA graphs on (captured_sizes
           shows they ran; fp8-triton: FP8 with herd's Triton FP8 kernels); each figure also
           as a ratio to the `herd plan` roofline for this device (H100 / H200 from the device
           name), layer count and batch. Then a profile of 10 decode steps at batch 1 and 64
           (--profile-batches): wall and device-busy ms per step and the kernels that take the
           most device time, to place the gap to the roofline.

  moe_bench herd's Triton grouped MoE GEMM (herd/ops/triton/moe_gemm.py) against torch._grouped_mm
           / torch._scaled_grouped_mm on Scout's expert shapes at decode sizes (T = 1, 16, 64, 256,
           top-1 of 16 experts), its default tiles and a sweep: ms, GB/s of active expert weights,
           error against the torch kernel.

--cpu-smoke runs the same code on the CPU at tiny shapes (Triton under TRITON_INTERPRET=1, tiny
models, enforce_eager; CUDA graphs cannot be captured there, so the graphs section then compares
two eager runs) so the script itself can be tested without a GPU, in well under a minute:

    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_check_smoke.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (HERE, REPO):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SECTIONS = ("env", "kernels", "graphs", "perf", "moe_bench")
# fp8-triton: online FP8 with herd's Triton FP8 kernels (expert GEMM at decode sizes, per-token
# quantization), which herd does not use by default yet; measured beside fp8 to decide that
PERF_PRECISIONS = ("bf16", "fp8", "fp8-triton")
T0 = float(os.environ.get("GPU_CHECK_T0") or time.time())   # section processes log the parent's clock


def log(msg: str) -> None:
    print(f"[gpu_check {time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def error_record(exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": "".join(tb)[-3000:]}


def clean(obj):
    """JSON-safe: non-finite floats become strings, tuples lists, unknown objects their str()."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


class SectionTimeout(Exception):
    pass


class Budget:
    """The global time budget, as a wall-clock deadline shared by the parent and section processes."""

    def __init__(self, seconds: float, deadline: float | None = None):
        self.seconds = float(seconds)
        self.deadline = deadline if deadline is not None else time.time() + self.seconds

    def left(self) -> float:
        return self.deadline - time.time()

    def spent(self) -> bool:
        return self.left() <= 0

    def note(self) -> str:
        return f"skipped: the time budget of {self.seconds:g} s was spent"


class Ctx:
    """What every section gets: the parsed args, the device, smoke mode, the budget, and publish()
    to save its partial result (what survives if the section later crashes or is killed)."""

    def __init__(self, args, budget: Budget, result_path: str | None = None):
        import torch

        self.args, self.budget, self.result_path = args, budget, result_path
        self.smoke = bool(args.cpu_smoke)
        self.cuda = torch.cuda.is_available() and not self.smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.published: dict = {}

    def publish(self, section: dict) -> None:
        self.published = section
        if self.result_path:
            _write(self.result_path, section)


def _sync(ctx: Ctx) -> None:
    import torch

    if ctx.cuda:
        torch.cuda.synchronize()


def planner_device_key(name: str) -> str | None:
    """The `herd plan --device` id of a CUDA device name (torch.cuda.get_device_name)."""
    n = name.lower()
    for key in ("h200", "h100", "b200", "a100", "mi325x", "mi300x"):
        if key in n.replace(" ", "").replace("-", ""):
            return key
    return None


# ------------------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------------------

def section_env(ctx: Ctx) -> dict:
    import torch

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "mode": "cpu-smoke" if ctx.smoke else "gpu", "cpu_count": os.cpu_count(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        out["triton"] = f"unavailable: {e}"
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        out["herd_commit"] = head.stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["herd_commit"] = None
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        out.update(device=name, capability=list(torch.cuda.get_device_capability(0)),
                   total_memory_gib=round(p.total_memory / 2**30, 2), multiprocessors=p.multi_processor_count,
                   device_count=torch.cuda.device_count(), planner_device=planner_device_key(name))
        free, total = torch.cuda.mem_get_info()
        out["free_memory_gib"] = round(free / 2**30, 2)
    else:
        out["device"] = "cpu"
        if not ctx.smoke:
            out["note"] = "CUDA is not available: the kernels, graphs and perf sections need a GPU (or --cpu-smoke)"
    return out


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _window_start(pos: int, chunk) -> int:
    return 0 if chunk is None else (pos // chunk) * chunk


class PagedCase:
    """A paged KV cache holding each sequence's context [0, seq_len - q_len); this step's queries
    and K/V are at positions [seq_len - q_len, seq_len). Physical blocks are shuffled; tables have
    two spare -1 columns; on chunked layers blocks entirely left of a sequence's first-query chunk
    are freed (-1) and its context there is not stored. Two copies of the cache: `kc/vc` (for the
    kernels) with every slot that holds no token set to NaN, `kc0/vc0` (for the references, which
    gather whole blocks) with zeros there."""

    def __init__(self, dev, *, bs, chunk, H, Hkv, d, dtype, kv_dtype, k_scale, v_scale, q_lens, seq_lens, seed):
        import torch

        from herd.ops.attention import store_kv

        g = torch.Generator().manual_seed(seed)
        self.bs, self.chunk, self.H, self.Hkv, self.d = bs, chunk, H, Hkv, d
        self.q_lens, self.seq_lens = list(q_lens), list(seq_lens)
        self.fp8 = kv_dtype == torch.float8_e4m3fn
        self.k_scale, self.v_scale = k_scale, v_scale             # as the kernels get them
        self.ks, self.vs = float(k_scale), float(v_scale)         # as the references get them
        self.scale = d ** -0.5
        B = len(seq_lens)
        n_blocks = [_cdiv(s, bs) for s in seq_lens]
        num_blocks = sum(n_blocks) + 2
        perm = torch.randperm(num_blocks, generator=g).tolist()
        table = torch.full((B, max(n_blocks) + 2), -1, dtype=torch.int64)
        for b, n in enumerate(n_blocks):
            table[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int64)
        if chunk is not None:
            for b in range(B):
                table[b, :_window_start(seq_lens[b] - q_lens[b], chunk) // bs] = -1
        self.table = table
        self.freed_blocks = int(sum(int((table[b, :n] < 0).sum()) for b, n in enumerate(n_blocks)))

        def slots(b, lo, hi):
            pos = torch.arange(lo, hi, dtype=torch.int64)
            phys = table[b, pos // bs]
            return torch.where(phys >= 0, phys * bs + pos % bs, -1)

        ctx_slots = torch.cat([slots(b, 0, s - ql) for b, (ql, s) in enumerate(zip(q_lens, seq_lens))])
        step_slots = torch.cat([slots(b, s - ql, s) for b, (ql, s) in enumerate(zip(q_lens, seq_lens))])
        positions = torch.cat([torch.arange(s - ql, s, dtype=torch.int64) for ql, s in zip(q_lens, seq_lens)])
        n_ctx, T = len(ctx_slots), len(step_slots)
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(dev)  # noqa: E731
        k_ctx, v_ctx = rnd(n_ctx, Hkv, d), rnd(n_ctx, Hkv, d)
        self.k_new, self.v_new, self.q = rnd(T, Hkv, d), rnd(T, Hkv, d), rnd(T, H, d)
        shape = (num_blocks, bs, Hkv, d)
        self.kc = torch.full(shape, float("nan"), device=dev).to(kv_dtype)
        self.vc = torch.full(shape, float("nan"), device=dev).to(kv_dtype)
        self.kc0 = torch.zeros(shape, device=dev).to(kv_dtype)
        self.vc0 = torch.zeros(shape, device=dev).to(kv_dtype)
        self.ctx_slots, self.step_slots = ctx_slots.to(dev), step_slots.to(dev)
        for kc, vc in ((self.kc, self.vc), (self.kc0, self.vc0)):
            store_kv(k_ctx, v_ctx, kc, vc, self.ctx_slots, self.ks, self.vs)
        self.positions = positions.to(dev)
        self.qsl_list = [0] + torch.tensor(q_lens).cumsum(0).tolist()
        self.qsl = torch.tensor(self.qsl_list, dtype=torch.int32, device=dev)
        self.seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        self.dev = dev

    def reference(self):
        """herd.ops.attention.paged_attention_ref in fp32 on the zero-filled cache copy (it stores
        this step's K/V itself); FP8 caches stay FP8 and are dequantized by the reference."""
        from herd.ops.attention import paged_attention_ref

        kref = self.kc0.clone() if self.fp8 else self.kc0.float()
        vref = self.vc0.clone() if self.fp8 else self.vc0.float()
        return paged_attention_ref(self.q.float(), self.k_new.float(), self.v_new.float(), self.positions,
                                   self.qsl_list, self.seq_lens, self.table.to(self.dev), self.step_slots,
                                   kref, vref, self.bs, self.chunk, self.scale, self.ks, self.vs)

    def cache_matches_store_kv(self) -> bool:
        """After reshape_and_cache into kc/vc: every written slot is bit-identical to store_kv's."""
        import torch

        from herd.ops.attention import store_kv

        kc0, vc0 = self.kc0.clone(), self.vc0.clone()
        store_kv(self.k_new, self.v_new, kc0, vc0, self.step_slots, self.ks, self.vs)
        written = torch.cat([self.ctx_slots, self.step_slots])
        written = written[written >= 0]
        same = True
        for a, b in ((self.kc, kc0), (self.vc, vc0)):
            x = a.view(-1, self.Hkv, self.d)[written].contiguous().view(torch.uint8)
            y = b.view(-1, self.Hkv, self.d)[written].contiguous().view(torch.uint8)
            same = same and torch.equal(x, y)
        return bool(same)


def _max_err(out, ref) -> float:
    return float((out.float() - ref.float()).abs().max())


def _finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t.float()).all())


# (atol, rtol): an output passes when |kernel - ref| <= atol + rtol * |ref| elementwise. The
# reference runs in fp32; the kernel rounds its output (and the softmax weights it feeds the PV
# dot) to the model dtype, so the rtol is ~2 ulps of that dtype (bf16 2^-7 / fp16 2^-10 per ulp).
ATTN_TOL = {"bfloat16": (1e-2, 1.6e-2), "float16": (1e-3, 2e-3)}
ATTN_FP8_TOL = {"bfloat16": (1e-2, 1.6e-2), "float16": (1.5e-3, 2e-3)}


def _closeness(out, ref, tol) -> tuple[float, float]:
    """(max abs error, worst error / allowed error); the case passes when the latter is <= 1."""
    atol, rtol = tol
    diff = (out.float() - ref.float()).abs()
    allowed = atol + rtol * ref.float().abs()
    return float(diff.max()), float((diff / allowed).max())


def _attn_shapes(ctx: Ctx, bs: int) -> dict:
    """Batch layouts per block size: decode, prefill from scratch across a chunk boundary, a
    sequence with no queries this step, a long decode (freed blocks on chunked layers), a chunked
    prefill on cached context crossing chunk boundaries, a short decode, a short prefill."""
    if ctx.smoke:
        if bs == 16:
            return dict(H=10, Hkv=2, d=32, chunk=24, q_lens=[1, 7, 0, 1, 20, 1], seq_lens=[30, 7, 12, 50, 55, 3])
        return dict(H=10, Hkv=2, d=32, chunk=48, q_lens=[1, 9, 0, 1, 20, 1], seq_lens=[140, 9, 12, 200, 150, 3])
    chunk = 200 if bs == 16 else 320          # neither a multiple of the block size
    return dict(H=10, Hkv=2, d=128, chunk=chunk, q_lens=[1, 300, 0, 1, 400, 1, 64],
                seq_lens=[700, 300, 50, 1500, 1100, 33, 64])


def _decode_shapes(ctx: Ctx, bs: int) -> dict:
    if ctx.smoke:
        return dict(H=10, Hkv=2, d=32, chunk=24 if bs == 16 else 48, seq_lens=[1, 17, 40, 150, 33])
    return dict(H=10, Hkv=2, d=128, chunk=200 if bs == 16 else 320, seq_lens=[1, 17, 300, 1000, 2500, 129, 4097])


def _scale_arg(ctx: Ctx, value: float, as_tensor: bool):
    import torch

    return torch.tensor([value], dtype=torch.float32, device=ctx.device) if as_tensor else value


def kernel_attention_case(ctx: Ctx, *, bs, chunked, dtype_name, fp8, tensor_scales, bt_int64) -> dict:
    import torch

    from herd.attention.backends.triton.kernels import paged_attention, reshape_and_cache

    dtype = getattr(torch, dtype_name)
    sh = _attn_shapes(ctx, bs)
    chunk = sh["chunk"] if chunked else None
    ks, vs = (0.02, 0.015) if fp8 else (1.0, 1.0)
    c = PagedCase(ctx.device, bs=bs, chunk=chunk, H=sh["H"], Hkv=sh["Hkv"], d=sh["d"], dtype=dtype,
                  kv_dtype=torch.float8_e4m3fn if fp8 else dtype,
                  k_scale=_scale_arg(ctx, ks, tensor_scales), v_scale=_scale_arg(ctx, vs, not tensor_scales),
                  q_lens=sh["q_lens"], seq_lens=sh["seq_lens"], seed=bs + 7 * chunked + 3 * fp8)
    bt = c.table.to(ctx.device).to(torch.int64 if bt_int64 else torch.int32)
    reshape_and_cache(c.k_new, c.v_new, c.kc, c.vc, c.step_slots, c.k_scale, c.v_scale)
    out = paged_attention(c.q, c.kc, c.vc, bt, c.qsl, c.seq_lens_t, max_query_len=max(c.q_lens),
                          max_seq_len=max(c.seq_lens), chunk=chunk, scale=c.scale, k_scale=c.k_scale,
                          v_scale=c.v_scale)
    _sync(ctx)
    ref = c.reference()
    tol = (ATTN_FP8_TOL if fp8 else ATTN_TOL)[dtype_name]
    err, worst = _closeness(out, ref, tol)
    finite = _finite(out)
    cache_ok = c.cache_matches_store_kv()
    return {"max_abs_err": err, "err_over_tol": worst, "atol_rtol": list(tol), "finite": finite,
            "cache_bit_exact": cache_ok, "freed_blocks": c.freed_blocks, "tokens": len(c.positions),
            "pass": finite and worst <= 1.0 and cache_ok}


def kernel_decode_case(ctx: Ctx, *, bs, chunked, dtype_name, fp8) -> dict:
    import torch

    from herd.attention.backends.triton.kernels import (default_num_splits, paged_attention, paged_decode,
                                                        reshape_and_cache)

    dtype = getattr(torch, dtype_name)
    sh = _decode_shapes(ctx, bs)
    chunk = sh["chunk"] if chunked else None
    ks, vs = (0.02, 0.015) if fp8 else (1.0, 1.0)
    n = len(sh["seq_lens"])
    c = PagedCase(ctx.device, bs=bs, chunk=chunk, H=sh["H"], Hkv=sh["Hkv"], d=sh["d"], dtype=dtype,
                  kv_dtype=torch.float8_e4m3fn if fp8 else dtype, k_scale=_scale_arg(ctx, ks, True),
                  v_scale=vs, q_lens=[1] * n, seq_lens=sh["seq_lens"], seed=100 + bs + chunked)
    bt = c.table.to(ctx.device).to(torch.int32)
    reshape_and_cache(c.k_new, c.v_new, c.kc, c.vc, c.step_slots, c.k_scale, c.v_scale)
    ref = c.reference()
    tol = (ATTN_FP8_TOL if fp8 else ATTN_TOL)[dtype_name]
    kw = dict(max_seq_len=max(c.seq_lens), chunk=chunk, scale=c.scale, k_scale=c.k_scale, v_scale=c.v_scale)
    auto = default_num_splits(max(c.seq_lens), chunk, n, sh["Hkv"])
    errs, worst, ok = {}, 0.0, True
    for splits in (1, 4, None, "paged_attention"):
        if splits == "paged_attention":
            label = "paged_attention"
            out = paged_attention(c.q, c.kc, c.vc, bt, c.qsl, c.seq_lens_t, max_query_len=1, **kw)
        else:
            label = f"splits={splits}" if splits is not None else f"splits=default({auto})"
            out = paged_decode(c.q, c.kc, c.vc, bt, c.seq_lens_t, num_splits=splits, **kw)
        _sync(ctx)
        errs[label], w = _closeness(out, ref, tol)
        worst = max(worst, w)
        ok = ok and _finite(out) and w <= 1.0
    cache_ok = c.cache_matches_store_kv()
    return {"max_abs_err": max(errs.values()), "errors": errs, "err_over_tol": worst, "atol_rtol": list(tol),
            "cache_bit_exact": cache_ok, "freed_blocks": c.freed_blocks, "pass": ok and cache_ok}


def kernel_cache_case(ctx: Ctx, *, src_dtype, kv_dtype, k_scale, v_scale, tensor_scales) -> dict:
    """reshape_and_cache vs store_kv, bit for bit: odd slots, -1 slots, values that saturate fp8."""
    import torch

    from herd.attention.backends.triton.kernels import reshape_and_cache
    from herd.ops.attention import store_kv

    g = torch.Generator().manual_seed(5)
    Hkv, d = (3, 24) if ctx.smoke else (8, 128)
    num_blocks, bs, T = 4, 16, 9
    k = (torch.randn(T, Hkv, d, generator=g) * 4).to(src_dtype).to(ctx.device)
    v = (torch.randn(T, Hkv, d, generator=g) * 400).to(src_dtype).to(ctx.device)   # saturates fp8 at +-448
    slots = torch.tensor([3, -1, 17, 63, -1, 0, 40, 41, 5], dtype=torch.int64, device=ctx.device)
    ref_k = torch.zeros(num_blocks, bs, Hkv, d, device=ctx.device).to(kv_dtype)
    ref_v = torch.zeros_like(ref_k)
    kc, vc = ref_k.clone(), ref_v.clone()
    store_kv(k, v, ref_k, ref_v, slots, k_scale, v_scale)
    reshape_and_cache(k, v, kc, vc, slots, _scale_arg(ctx, k_scale, tensor_scales),
                      _scale_arg(ctx, v_scale, tensor_scales))
    _sync(ctx)
    diff = sum(int((a.view(torch.uint8) != b.view(torch.uint8)).sum()) for a, b in ((kc, ref_k), (vc, ref_v)))
    return {"bit_exact": diff == 0, "differing_bytes": diff, "pass": diff == 0}


MOE_TOL = {"bf16": 1e-2, "fp8": 3e-2}


def _moe_inputs(ctx: Ctx, T: int, top_k: int, seed: int):
    """A random bf16 MoE layer and routing: (x, w13, w2, top_idx, router weights)."""
    import torch

    E, D, I = (4, 64, 32) if ctx.smoke else (16, 2048, 1024)
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype).to(ctx.device)
    w13 = (torch.randn(E, 2 * I, D, generator=g) * 0.05).to(dtype).to(ctx.device)
    w2 = (torch.randn(E, D, I, generator=g) * 0.05).to(dtype).to(ctx.device)
    top_val, top_idx = torch.topk(torch.randn(T, E, generator=g).to(ctx.device), top_k, dim=-1)
    return x, w13, w2, top_idx, torch.sigmoid(top_val).to(dtype)


def _fp8_moe_layer(ctx: Ctx, w13, w2):
    """A FusedMoE with Fp8MoEMethod holding these bf16 experts, quantized online."""
    import torch

    from herd.model.llama4 import FusedMoE
    from herd.parallel.context import SINGLE
    from herd.quant.methods import Fp8MoEMethod

    E, two_i, D = w13.shape
    with torch.device(ctx.device):
        layer = FusedMoE(E, D, two_i // 2, w13.dtype, SINGLE, False, Fp8MoEMethod())
    layer.w13_weight.data.copy_(w13)
    layer.w2_weight.data.copy_(w2)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def kernel_moe_case(ctx: Ctx, *, T, top_k, fp8) -> dict:
    """Relative error max|fast - ref| / max|ref| of the grouped MoE against the per-expert loop."""
    from herd.ops.moe import fused_moe, fused_moe_ref, grouped_moe_supported, triton_moe_gemm

    x, w13, w2, top_idx, weights = _moe_inputs(ctx, T, top_k, seed=T * 10 + top_k)
    E, D, I = w13.shape[0], w13.shape[2], w2.shape[2]
    ref_bf16 = fused_moe_ref(x, w13, w2, top_idx, weights)
    scale = float(ref_bf16.abs().max()) or 1.0
    if not fp8:
        out = fused_moe(x, w13, w2, top_idx, weights)
        _sync(ctx)
        rel = _max_err(out, ref_bf16) / scale
        path = ("triton" if triton_moe_gemm(T * top_k, E, x.device) else "grouped_mm") if grouped_moe_supported(
            x, w13, w2) else "reference fallback"
        return {"path": path,
                "max_abs_err": _max_err(out, ref_bf16), "rel_err": rel, "tol_rel": MOE_TOL["bf16"],
                "pass": _finite(out) and rel <= MOE_TOL["bf16"]}

    layer = _fp8_moe_layer(ctx, w13, w2)
    try:
        from herd.quant.methods.fp8 import _fp8_grouped_kind
        kind = _fp8_grouped_kind(x, D, I) or "reference loop"
    except Exception:  # noqa: BLE001 (a private helper; only for the report)
        kind = "unknown"
    out = layer(x, top_idx, weights)
    ref = layer.quant_method.apply_reference(layer, x, top_idx, weights)
    _sync(ctx)
    rel = _max_err(out, ref) / (float(ref.abs().max()) or 1.0)
    return {"path": kind, "max_abs_err": _max_err(out, ref), "rel_err": rel, "tol_rel": MOE_TOL["fp8"],
            "fp8_vs_bf16_rel_err": _max_err(out, ref_bf16) / scale,
            "pass": _finite(out) and rel <= MOE_TOL["fp8"]}


def kernel_fp8_quant_case(ctx: Ctx, *, T, K) -> dict:
    """herd's one-kernel per-token FP8 quantization (what quantize_per_token runs on CUDA) vs the
    torch reference, bit for bit, bf16 rows with a zero row and values at e4m3 ties."""
    import torch

    from herd.ops.fp8 import quantize_per_token_ref
    from herd.ops.triton.fp8_quant import per_token_quant

    g = torch.Generator().manual_seed(T + K)
    x = (torch.randn(T, K, generator=g) * 3).to(torch.bfloat16)
    if T > 2:
        x[1] = 0
        x[2, :4] = torch.tensor([448.0, 127.6, 0.75, 50.0]).to(torch.bfloat16)
    x = x.to(ctx.device)
    q, s = per_token_quant(x)
    q_ref, s_ref = quantize_per_token_ref(x)
    _sync(ctx)
    bytes_diff = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
    scales_diff = int((s != s_ref).sum())
    return {"differing_bytes": bytes_diff, "differing_scales": scales_diff, "pass": bytes_diff == 0 and scales_diff == 0}


@contextlib.contextmanager
def triton_fp8_kernels(ctx: Ctx):
    """FP8 layers with herd's Triton kernels: the grouped expert GEMM at decode sizes
    (herd.quant.methods.fp8.TRITON_FP8_MOE) and, on CUDA, the per-token activation quantization
    (herd.ops.fp8.TRITON_PER_TOKEN_QUANT). On the CPU smoke run the GEMM is forced in
    (interpreted) where CUDA would take it, so that the code path runs."""
    from unittest import mock

    import herd.ops.fp8 as fp8ops
    import herd.quant.methods.fp8 as fp8mod
    patches = [mock.patch.object(fp8mod, "TRITON_FP8_MOE", True), mock.patch.object(fp8ops, "TRITON_PER_TOKEN_QUANT", True)]
    if ctx.smoke:
        from herd.ops.triton.moe_gemm import moe_gemm
        patches += [mock.patch.object(fp8mod, "triton_moe_gemm", lambda *a: moe_gemm),
                    mock.patch.object(fp8mod, "_fp8_grouped_kind", lambda *a: "scaled")]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def kernel_moe_fp8_triton_case(ctx: Ctx, *, T, top_k) -> dict:
    """FP8 experts, herd's Triton grouped GEMM vs torch's FP8 GEMM, judged by what FP8 is for:
    each path's distance from the unquantized layer (fp32 experts), as a relative L2 error. The
    two compute the same W8A8 product with different fp32 rounding, and a one-ulp difference in a
    bf16 intermediate can flip the fp8 rounding of the next projection's input, so neither is
    bit-identical to the other, and one draw is noisy: errors are the mean over 8 random layers and
    inputs. The Triton path passes when its mean error is within 1.1x of torch's (+ 1e-3). Also
    reported: the largest difference between the two paths (of the output's max)."""
    from herd.ops.moe import fused_moe_ref

    errs_torch, errs_triton, apart, finite = [], [], 0.0, True
    for draw in range(8):
        x, w13, w2, top_idx, weights = _moe_inputs(ctx, T, top_k, seed=T * 100 + top_k * 10 + draw)
        layer = _fp8_moe_layer(ctx, w13, w2)
        ref = fused_moe_ref(x.float(), w13.float(), w2.float(), top_idx, weights.float())
        torch_out = layer(x, top_idx, weights)
        with triton_fp8_kernels(ctx):
            triton_out = layer(x, top_idx, weights)
        _sync(ctx)
        errs_torch.append(float((torch_out.float() - ref).norm() / ref.norm()))
        errs_triton.append(float((triton_out.float() - ref).norm() / ref.norm()))
        apart = max(apart, _max_err(triton_out, torch_out) / (float(torch_out.float().abs().max()) or 1.0))
        finite = finite and _finite(triton_out)
    err_torch, err_triton = sum(errs_torch) / 8, sum(errs_triton) / 8
    return {"rel_err": err_triton, "torch_rel_err": err_torch, "draws": 8,
            "triton_better_in": sum(a < b for a, b in zip(errs_triton, errs_torch)), "triton_vs_torch_max": apart,
            "pass": finite and err_triton <= 1.1 * err_torch + 1e-3}


def _run_cases(ctx: Ctx, group: str, cases: list[tuple[str, callable]], out: dict) -> None:
    """Run each case on its own (an exception fails that case only) into out[group]."""
    rows = out[group] = []
    for name, fn in cases:
        if ctx.budget.spent():
            rows.append({"name": name, "skipped": ctx.budget.note(), "pass": None})
            continue
        t = time.time()
        try:
            row = {"name": name, **fn()}
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            row = {"name": name, **error_record(e), "pass": False}
        row["wall_s"] = round(time.time() - t, 2)
        status = "PASS" if row.get("pass") else ("skip" if row.get("pass") is None else "FAIL")
        err = row.get("max_abs_err", row.get("rel_err", ""))
        log(f"  {group} {name}: {status} {err if err == '' else f'{err:.3g}'}"
            f"{' ' + row['error'] if 'error' in row else ''}")
        rows.append(row)
        ctx.publish(out)


def section_kernels(ctx: Ctx) -> dict:
    if not ctx.cuda and not ctx.smoke:
        return {"skipped": "needs CUDA (or --cpu-smoke for the Triton interpreter)"}
    from functools import partial

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False    # the fp32 references must really be fp32
    torch.backends.cudnn.allow_tf32 = False

    attn, dec = [], []
    for bs in (16, 128):
        for chunked in (True, False):
            for dt in ("bfloat16", "float16"):
                attn.append((f"bs{bs}-{'chunked' if chunked else 'global'}-{dt}",
                             partial(kernel_attention_case, ctx, bs=bs, chunked=chunked, dtype_name=dt, fp8=False,
                                     tensor_scales=False, bt_int64=dt == "float16")))
            attn.append((f"bs{bs}-{'chunked' if chunked else 'global'}-bfloat16-fp8kv",
                         partial(kernel_attention_case, ctx, bs=bs, chunked=chunked, dtype_name="bfloat16", fp8=True,
                                 tensor_scales=chunked, bt_int64=False)))
            dec.append((f"bs{bs}-{'chunked' if chunked else 'global'}-bfloat16",
                        partial(kernel_decode_case, ctx, bs=bs, chunked=chunked, dtype_name="bfloat16", fp8=False)))
    attn.append(("bs16-chunked-float16-fp8kv", partial(kernel_attention_case, ctx, bs=16, chunked=True,
                                                        dtype_name="float16", fp8=True, tensor_scales=True,
                                                        bt_int64=True)))
    for bs, chunked, dt, fp8_kv in ((16, False, "float16", False), (16, True, "bfloat16", True),
                                    (128, False, "float16", True)):
        dec.append((f"bs{bs}-{'chunked' if chunked else 'global'}-{dt}{'-fp8kv' if fp8_kv else ''}",
                    partial(kernel_decode_case, ctx, bs=bs, chunked=chunked, dtype_name=dt, fp8=fp8_kv)))
    fp8 = torch.float8_e4m3fn
    cache = [("bfloat16", partial(kernel_cache_case, ctx, src_dtype=torch.bfloat16, kv_dtype=torch.bfloat16,
                                  k_scale=1.0, v_scale=1.0, tensor_scales=False)),
             ("float16", partial(kernel_cache_case, ctx, src_dtype=torch.float16, kv_dtype=torch.float16,
                                 k_scale=1.0, v_scale=1.0, tensor_scales=False)),
             ("fp8-float-scales", partial(kernel_cache_case, ctx, src_dtype=torch.bfloat16, kv_dtype=fp8,
                                          k_scale=0.02, v_scale=0.5, tensor_scales=False)),
             ("fp8-tensor-scales", partial(kernel_cache_case, ctx, src_dtype=torch.float16, kv_dtype=fp8,
                                           k_scale=0.013, v_scale=3.0, tensor_scales=True))]
    moe = []
    for fp8_moe in (False, True):
        for T in ((1, 13) if ctx.smoke else (1, 13, 512)):
            for k in (1, 2):
                moe.append((f"{'fp8' if fp8_moe else 'bf16'}-T{T}-top{k}",
                            partial(kernel_moe_case, ctx, T=T, top_k=k, fp8=fp8_moe)))
    for T in ((1, 13) if ctx.smoke else (1, 13, 64, 256)):
        moe.append((f"fp8-triton-T{T}-top1", partial(kernel_moe_fp8_triton_case, ctx, T=T, top_k=1)))
    quant = [(f"T{T}-K{K}", partial(kernel_fp8_quant_case, ctx, T=T, K=K))
             for T, K in (((1, 64), (5, 300)) if ctx.smoke else ((1, 5120), (64, 8192), (256, 5120)))]
    out: dict = {}
    groups = ctx.args.kernel_groups.split(",")
    for group, cases in (("reshape_and_cache", cache), ("paged_attention", attn), ("paged_decode", dec), ("moe", moe),
                         ("fp8_quant", quant)):
        if group not in groups:
            continue
        log(f"kernels: {group} ({len(cases)} cases)")
        _run_cases(ctx, group, cases, out)
    rows = [r for g in out.values() for r in g]
    failed = [r["name"] for g, rs in out.items() for r in rs if r.get("pass") is False]
    out["summary"] = {"cases": len(rows), "passed": sum(1 for r in rows if r.get("pass")),
                      "failed": failed, "skipped": sum(1 for r in rows if r.get("pass") is None),
                      "all_pass": not failed and all(r.get("pass") for r in rows)}
    return out


# ------------------------------------------------------------------------------------------------
# graphs
# ------------------------------------------------------------------------------------------------

def _llm(path: str, **kw):
    from herd import LLM

    return LLM(path, **kw)


def _decode_graph_sizes(llm) -> tuple[str | None, list[int]]:
    runner = getattr(llm.llm_engine.executor, "runner", None)
    dg = getattr(runner, "decode_graphs", None)
    if dg is None:
        return None, []
    return getattr(dg, "mode", None), sorted(getattr(dg, "graphs", {}) or {})


def section_graphs(ctx: Ctx) -> dict:
    if not ctx.cuda and not ctx.smoke:
        return {"skipped": "needs CUDA (or --cpu-smoke)"}
    import random

    import torch

    from _gpu_models import collect, shutdown_llm, tiny_checkpoint
    from herd import SamplingParams
    from herd.ops.moe import grouped_mm_supported

    tmp = tempfile.mkdtemp(prefix="gpu_check_graphs_")
    rng = random.Random(0)
    prompts = [[rng.randrange(6, 320) for _ in range(n)] for n in (5, 17, 33, 64, 100, 9)]
    calls = [prompts, prompts[:1], prompts[1:4]]   # decode batches 6 (-> 8), 1, 3 (-> 4)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    dtypes = ["bfloat16"]
    notes = {}
    if ctx.smoke or grouped_mm_supported(torch.float32, ctx.device, 64, 96):
        dtypes.append("float32")
    else:
        notes["float32"] = ("skipped: herd's grouped MoE GEMM (torch._grouped_mm) takes bf16 only on CUDA; "
                            "fp32 falls back to the per-expert loop, whose host reads cannot be captured")
    notes["splits"] = ("eager decode steps split the keys as default_num_splits picks, captured ones into the triton "
                       "backend's fixed graph_splits (8), so bf16 rounding can differ slightly; first_mismatch "
                       "locates a differing greedy token")
    out = {"notes": notes, "cases": {}}
    for variant in ("scout", "maverick"):
        try:
            path = tiny_checkpoint(os.path.join(tmp, variant), variant, attention_chunk_size=24)
        except Exception as e:  # noqa: BLE001
            out["cases"][variant] = error_record(e)
            continue
        for dtype in dtypes:
            name = f"{variant}-{dtype}"
            if ctx.budget.spent():
                out["cases"][name] = {"skipped": ctx.budget.note()}
                continue
            t = time.time()
            case: dict = {}
            try:
                tokens = {}
                for mode in ("eager", "graphs"):
                    kw = dict(dtype=dtype, max_model_len=256, block_size=16, num_kv_blocks=128, max_num_seqs=8,
                              enable_prefix_caching=False, seed=0, enforce_eager=mode == "eager")
                    if mode == "graphs":
                        kw["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, 4, 8]}
                    llm = _llm(path, **kw)
                    try:
                        tokens[mode] = [[list(o.outputs[0].token_ids) for o in llm.generate(c, params, use_tqdm=False)]
                                        for c in calls]
                        gmode, sizes = _decode_graph_sizes(llm)
                        case[mode] = {"graph_mode": gmode, "captured_sizes": sizes,
                                      "attention_backend": llm.llm_engine.executor.runner.attn_backend.name}
                    finally:
                        shutdown_llm(llm)
                        del llm
                        collect()
                flat = lambda m: [t for call in tokens[m] for t in call]  # noqa: E731
                mismatches = [i for i, (a, b) in enumerate(zip(flat("eager"), flat("graphs"))) if a != b]
                first = None
                if mismatches:
                    a, b = flat("eager")[mismatches[0]], flat("graphs")[mismatches[0]]
                    first = {"sequence": mismatches[0],
                             "token_index": next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)}
                used = bool(case["graphs"]["captured_sizes"])
                case.update(match=not mismatches, mismatched_sequences=len(mismatches), first_mismatch=first,
                            sequences=len(flat("eager")), tokens_per_sequence=params.max_tokens,
                            graphs_used=used, num_captured_sizes=len(case["graphs"]["captured_sizes"]),
                            **{"pass": (not mismatches) and (used or not ctx.cuda)})
                if not ctx.cuda:
                    case["note"] = "CPU: enforce_eager=False does not capture (no CUDA); both runs are eager"
            except SectionTimeout:
                raise
            except Exception as e:  # noqa: BLE001
                case.update(error_record(e))
                case["pass"] = False
            case["wall_s"] = round(time.time() - t, 2)
            log(f"  graphs {name}: match={case.get('match')} captured={case.get('graphs', {}).get('captured_sizes')}"
                f"{' ' + case['error'] if 'error' in case else ''}")
            out["cases"][name] = case
            ctx.publish(out)
    out["all_pass"] = all(c.get("pass") for c in out["cases"].values() if "skipped" not in c)
    return out


# ------------------------------------------------------------------------------------------------
# perf
# ------------------------------------------------------------------------------------------------

_REQ = iter(range(1 << 60))


def drive(llm, prompts: list[list[int]], params) -> dict:
    """Run requests through LLMEngine.step() and time every step. A step counts as decode when
    every request already had its first token before it (so no prefill shares it). On an error the
    requests are aborted, so that the next measurement starts from an idle engine."""
    engine = llm.llm_engine
    rids = []
    prefill_s = decode_s = 0.0
    decode_tokens = decode_steps = prefill_steps = 0
    # time the executor (inputs to the device, forward, sampling; it returns host token ids) apart
    # from the engine's own work (scheduling, detokenizing, outputs)
    executor, exec_s = engine.executor, [0.0]
    execute = executor.execute

    def timed_execute(*a, **kw):
        t0 = time.perf_counter()
        try:
            return execute(*a, **kw)
        finally:
            exec_s[0] += time.perf_counter() - t0

    executor.execute = timed_execute
    decode_exec_s = 0.0
    try:
        for p in prompts:
            rid = f"gpu-check-{next(_REQ)}"
            engine.add_request(rid, {"prompt_token_ids": p}, params)
            rids.append(rid)
        produced = dict.fromkeys(rids, 0)
        while engine.has_unfinished_requests():
            all_started = all(produced[r] > 0 for r in rids)
            exec_before = exec_s[0]
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            new = 0
            for o in outs:
                if o.request_id in produced:
                    n = len(o.outputs[0].token_ids)
                    new += n - produced[o.request_id]
                    produced[o.request_id] = n
            if all_started:
                decode_s += dt
                decode_exec_s += exec_s[0] - exec_before
                decode_tokens += new
                decode_steps += 1
            else:
                prefill_s += dt
                prefill_steps += 1
    finally:
        del executor.execute       # back to the class method
        for rid in rids:
            engine.abort_request(rid)
    return {"prefill_s": prefill_s, "prefill_steps": prefill_steps, "decode_s": decode_s,
            "decode_exec_s": decode_exec_s, "decode_steps": decode_steps, "decode_tokens": decode_tokens}


def profile_decode(llm, prompts: list[list[int]], steps: int, cuda: bool) -> dict:
    """Where one decode step's time goes: the requests are prefilled and decode twice unprofiled,
    then `steps` all-decode steps run under torch.profiler. Reports the wall time per step, the
    device's kernel time per step (their sum: idle gaps = wall - busy) and the kernels that take
    most of it, so the gap to the roofline can be placed (host gaps vs slow kernels)."""
    from herd import SamplingParams
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    engine = llm.llm_engine
    rids = [f"gpu-check-prof-{next(_REQ)}" for _ in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    try:
        for rid, p in zip(rids, prompts):
            engine.add_request(rid, {"prompt_token_ids": p}, params)
        for _ in range(64):              # until every request has its first token, then 2 more
            outs = engine.step()
            if len(outs) == len(rids) and all(len(o.outputs[0].token_ids) >= 3 for o in outs):
                break
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                engine.step()
            _sync_cuda(cuda)
        wall = time.perf_counter() - t
    finally:
        for rid in rids:
            engine.abort_request(rid)
    # kernel events (CUPTI records the kernels a CUDA-graph replay runs too); on the CPU smoke run
    # the CPU ops stand in for them (nested, so their sum overcounts: only the code path is tested)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    agg: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == kind:
            a = agg.setdefault(e.name, [0.0, 0])
            a[0] += e.time_range.elapsed_us()
            a[1] += 1
    top = sorted(agg.items(), key=lambda kv: kv[1][0], reverse=True)
    busy = sum(us for us, _ in agg.values())
    return {"steps": steps, "ms_per_step": 1e3 * wall / steps, "device_busy_ms_per_step": busy / 1e3 / steps,
            "device_busy_fraction": (busy / 1e6) / wall if wall > 0 else None,
            "kernels_per_step": sum(n for _, n in agg.values()) / steps,
            "top_kernels": [{"name": name[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps,
                             "share": us / busy if busy else None} for name, (us, n) in top[:14]]}


def _sync_cuda(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def _random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(length)] for _ in range(n)]


def prefill_roofline_tok_s(spec, device, dtype: str, n_prompts: int, prompt_len: int, step_tokens: int) -> dict:
    """The planner's prefill bound (herd.plan.roofline.prefill_estimate) for n prompts processed in
    scheduler steps of `step_tokens` tokens that may hold several prompts: per step, max(weight +
    KV bytes / bandwidth, linear FLOPs + attention FLOPs / peak), from the planner's own pieces."""
    from herd.plan.memory import kv_cache_layout
    from herd.plan.params import bytes_read_per_device
    from herd.plan.roofline import attention_flops, linear_seconds_per_token

    t = spec.text
    kv = kv_cache_layout(t, 1, "auto")
    per_token = linear_seconds_per_token(spec, device, dtype, 1)
    work = [(p, 0) for p in range(n_prompts)]     # (prompt, tokens done)
    total = compute_total = 0.0
    while work:
        budget, attn, kv_bytes, tokens = step_tokens, 0.0, 0.0, 0
        while work and budget:
            p, done = work[0]
            take = min(budget, prompt_len - done)
            attn += attention_flops(spec, kv, 1, done, done + take)
            kv_bytes += kv.bytes_for(done + take)
            budget -= take
            tokens += take
            if done + take == prompt_len:
                work.pop(0)
            else:
                work[0] = (p, done + take)
        mem = (bytes_read_per_device(spec.groups, dtype, 1, tokens, t.num_local_experts, t.num_experts_per_tok)
               + kv_bytes) / device.bandwidth
        compute = tokens * per_token + attn / device.peak_flops(False)
        total += max(mem, compute)
        compute_total += compute if compute >= mem else 0.0
    return {"tokens_per_s": n_prompts * prompt_len / total,
            "bound": "compute" if compute_total * 2 >= total else "memory"}


def decode_roofline_tok_s(spec, device, dtype: str, batch: int, context_len: int, settings) -> dict:
    """`herd plan`'s decode roofline (herd.plan.planner.make_plan) at this batch and context."""
    from herd.plan.planner import make_plan

    plan = make_plan(spec, device, settings, tp=1, batch_size=batch, context_len=context_len)
    est = next(e for e in plan.decode if e.batch_size == batch)
    return {"tokens_per_s": est.tokens_per_s, "bound": est.step.bound}


def _perf_settings(ctx: Ctx) -> dict:
    if ctx.smoke:
        return dict(batches=[1, 4], prompt_len=16, output_len=8, prefill_batch=2, prefill_len=64,
                    block_size=16, max_model_len=64 + 16)
    batches = [int(b) for b in ctx.args.perf_batches.split(",")]
    return dict(batches=batches, prompt_len=64, output_len=128, prefill_batch=16, prefill_len=1024,
                block_size=128, max_model_len=1024 + 64)


def section_perf(ctx: Ctx) -> dict:
    if not ctx.cuda and not ctx.smoke:
        return {"skipped": "needs CUDA (or --cpu-smoke)"}
    import torch

    from _gpu_models import (collect, layers_that_fit, random_weights, scout_text_config, shutdown_llm,
                             tiny_perf_text_config, write_config_checkpoint)
    from herd import SamplingParams
    from herd.plan.hardware import get_device
    from herd.plan.memory import PlanSettings
    from herd.plan.models import spec_from_dict

    s = _perf_settings(ctx)
    make_cfg = tiny_perf_text_config if ctx.smoke else scout_text_config
    if ctx.cuda:
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name(0)
    else:   # smoke: a nominal 2 MiB "device", so that the tiny model gets a few layers the same way
        free = total = 2 << 20
        name = "cpu"
    frac = ctx.args.perf_mem_frac
    layers, base, per_layer = layers_that_fit(make_cfg, frac * total)
    bs = s["block_size"]
    num_kv_blocks = (max(max(s["batches"]) * _cdiv(s["prompt_len"] + s["output_len"], bs),
                         s["prefill_batch"] * _cdiv(s["prefill_len"] + 1, bs), _cdiv(s["max_model_len"], bs)) + 8)
    c1 = make_cfg(1)
    kv_per_layer = 2 * (num_kv_blocks + 1) * bs * c1["num_key_value_heads"] * c1["head_dim"] * 2
    # and what is free now: weights + KV cache + ~8 GiB of activations, graphs and workspace
    reserve = 0 if ctx.smoke else 8 << 30
    while layers > 1 and base + layers * (per_layer + kv_per_layer) + reserve > free:
        layers -= 1
    if ctx.args.perf_layers:
        layers = ctx.args.perf_layers
    text_cfg = make_cfg(layers)
    key = planner_device_key(name) if ctx.cuda else "h100"
    out = {"model": {"layers": layers, "nope_layers": [i for i in range(layers) if (i + 1) % 4 == 0],
                     "hidden_size": text_cfg["hidden_size"], "num_local_experts": text_cfg["num_local_experts"],
                     "intermediate_size": text_cfg["intermediate_size"], "vocab_size": text_cfg["vocab_size"],
                     "heads": [text_cfg["num_attention_heads"], text_cfg["num_key_value_heads"], text_cfg["head_dim"]],
                     "attention_chunk_size": text_cfg["attention_chunk_size"],
                     "bf16_weight_gib": round((base + layers * per_layer) / 2**30, 3),
                     "bf16_gib_per_layer": round(per_layer / 2**30, 4), "memory_fraction": frac,
                     "kv_cache_gib": round(layers * kv_per_layer / 2**30, 3),
                     "device_total_gib": round(total / 2**30, 2), "device_free_gib_at_start": round(free / 2**30, 2),
                     "weights": "random N(0, 0.02), made on the device by a patched loader (no files); "
                                "fp8 = online quantization of those BF16 weights"},
           "settings": s, "planner_device": key, "runs": {}}
    out["roofline_note"] = ("herd.plan's decode roofline (make_plan at this batch, context = prompt + output / 2) "
                            "and its prefill formula applied to steps of max_num_batched_tokens; for fp8 the planner "
                            "keeps attention projections in BF16 while herd's online FP8 quantizes them too")
    if ctx.smoke:
        out["planner_device_note"] = "CPU smoke: ratios are against the h100 roofline only to exercise the lookup"
    path = write_config_checkpoint(tempfile.mkdtemp(prefix="gpu_check_perf_"), text_cfg)
    spec = spec_from_dict(dict(text_cfg), "gpu-check-scout", path)
    device = get_device(key) if key else None
    max_batch = max(s["batches"] + [s["prefill_batch"]])
    step_tokens = max(max(s["batches"]) * s["prompt_len"], s["prefill_batch"] * s["prefill_len"])
    out["engine"] = {"max_num_seqs": max_batch, "max_num_batched_tokens": step_tokens,
                     "num_kv_blocks": num_kv_blocks, "block_size": bs, "max_model_len": s["max_model_len"],
                     "enforce_eager": ctx.smoke, "enable_prefix_caching": False}
    ctx_len = s["prompt_len"] + s["output_len"] // 2

    wanted = [p for p in PERF_PRECISIONS if p in ctx.args.perf_precisions.split(",")]
    for prec in wanted if ctx.args._precision is None else [ctx.args._precision]:
        base = "fp8" if prec.startswith("fp8") else prec
        if ctx.budget.spent():
            out["runs"][prec] = {"skipped": ctx.budget.note()}
            continue
        run: dict = {"layers": layers}
        out["runs"][prec] = run
        llm = None
        stack = contextlib.ExitStack()    # fp8-triton's kernel choice, for this run's whole life
        try:
            t = time.time()
            log(f"perf {prec}: building {layers} layers")
            if prec == "fp8-triton":
                stack.enter_context(triton_fp8_kernels(ctx))
            with random_weights():
                llm = _llm(path, dtype="bfloat16", quantization="fp8" if base == "fp8" else None,
                           max_model_len=s["max_model_len"], block_size=bs, num_kv_blocks=num_kv_blocks,
                           max_num_seqs=max_batch, max_num_batched_tokens=step_tokens,
                           enable_prefix_caching=False, enforce_eager=ctx.smoke, seed=0)
            _sync(ctx)
            run["build_s"] = round(time.time() - t, 1)
            ctx.publish(out)
            runner = llm.llm_engine.executor.runner
            mem = runner.weight_memory()
            run["weight_bytes"] = mem
            run["weight_gib"] = round(sum(mem.values()) / 2**30, 3)
            run["attention_backend"] = runner.attn_backend.name
            del runner
            if ctx.cuda:
                run["allocated_gib_after_build"] = round(torch.cuda.memory_allocated() / 2**30, 2)
            settings = PlanSettings(dtype=base, max_model_len=s["max_model_len"], max_num_seqs=max_batch,
                                    max_num_batched_tokens=step_tokens)
            decode = {}
            run["decode"] = decode
            for B in s["batches"]:
                if ctx.budget.spent():
                    decode[str(B)] = {"skipped": ctx.budget.note()}
                    continue
                row = {}
                decode[str(B)] = row
                try:
                    prompts = _random_prompts(B, s["prompt_len"], text_cfg["vocab_size"], seed=B)
                    drive(llm, prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
                    prompts = _random_prompts(B, s["prompt_len"], text_cfg["vocab_size"], seed=1000 + B)
                    greedy = SamplingParams(temperature=0.0, max_tokens=s["output_len"], ignore_eos=True)
                    r = drive(llm, prompts, greedy)
                    tok_s = r["decode_tokens"] / r["decode_s"] if r["decode_s"] > 0 else None
                    steps = max(r["decode_steps"], 1)
                    row.update(decode_tok_s=tok_s, ms_per_step=1e3 * r["decode_s"] / steps,
                               executor_ms_per_step=1e3 * r["decode_exec_s"] / steps,
                               decode_steps=r["decode_steps"], decode_tokens=r["decode_tokens"],
                               prefill_steps=r["prefill_steps"], prefill_s=round(r["prefill_s"], 4))
                    if device is not None:
                        roof = decode_roofline_tok_s(spec, device, base, B, ctx_len, settings)
                        row.update(roofline_tok_s=roof["tokens_per_s"], roofline_bound=roof["bound"],
                                   ratio_to_roofline=tok_s / roof["tokens_per_s"] if tok_s else None)
                except SectionTimeout:
                    raise
                except Exception as e:  # noqa: BLE001
                    row.update(error_record(e))
                ctx.publish(out)
                log(f"  perf {prec} decode batch {B}: {row.get('decode_tok_s')} tok/s "
                    f"(ratio {row.get('ratio_to_roofline')}){' ' + row['error'] if 'error' in row else ''}")
            row = {}
            run["prefill"] = row
            if ctx.budget.spent():
                row["skipped"] = ctx.budget.note()
            else:
                try:
                    n, L = s["prefill_batch"], s["prefill_len"]
                    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
                    drive(llm, _random_prompts(n, L, text_cfg["vocab_size"], seed=7), one)    # warm-up
                    r = drive(llm, _random_prompts(n, L, text_cfg["vocab_size"], seed=8), one)
                    tok_s = n * L / r["prefill_s"]
                    row.update(prompts=n, prompt_len=L, prefill_tok_s=tok_s, steps=r["prefill_steps"],
                               seconds=round(r["prefill_s"], 4))
                    if device is not None:
                        roof = prefill_roofline_tok_s(spec, device, base, n, L, step_tokens)
                        row.update(roofline_tok_s=roof["tokens_per_s"], roofline_bound=roof["bound"],
                                   ratio_to_roofline=tok_s / roof["tokens_per_s"])
                except SectionTimeout:
                    raise
                except Exception as e:  # noqa: BLE001
                    row.update(error_record(e))
                ctx.publish(out)
                log(f"  perf {prec} prefill: {row.get('prefill_tok_s')} tok/s (ratio {row.get('ratio_to_roofline')})"
                    f"{' ' + row['error'] if 'error' in row else ''}")
            prof_batches = sorted({min(int(b), max_batch) for b in ctx.args.profile_batches.split(",") if b})
            if prof_batches:
                run["profile"] = {}
            for B in prof_batches:
                if ctx.budget.spent():
                    run["profile"][str(B)] = {"skipped": ctx.budget.note()}
                    continue
                try:
                    prompts = _random_prompts(B, s["prompt_len"], text_cfg["vocab_size"], seed=3000 + B)
                    run["profile"][str(B)] = prof = profile_decode(llm, prompts, 4 if ctx.smoke else 10, ctx.cuda)
                    log(f"  perf {prec} profile batch {B}: {prof['ms_per_step']:.2f} ms/step, device busy "
                        f"{prof['device_busy_ms_per_step']:.2f} ms; top: "
                        + ", ".join(f"{k['name'][:40]} {k['ms_per_step']:.2f}" for k in prof["top_kernels"][:4]))
                except SectionTimeout:
                    raise
                except Exception as e:  # noqa: BLE001
                    run["profile"][str(B)] = error_record(e)
                ctx.publish(out)
            gmode, sizes = _decode_graph_sizes(llm)
            run.update(graph_mode=gmode, captured_sizes=sizes)
            if ctx.cuda:
                run["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            run.update(error_record(e))
            log(f"  perf {prec}: {run['error']}")
        finally:
            stack.close()
            if llm is not None:
                try:
                    shutdown_llm(llm)
                except Exception as e:  # noqa: BLE001
                    run["shutdown_error"] = str(e)
            llm = None
            collect()
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
                run["free_gib_after_release"] = round(torch.cuda.mem_get_info()[0] / 2**30, 2)
            ctx.publish(out)
    return out


# ------------------------------------------------------------------------------------------------
# moe_bench
# ------------------------------------------------------------------------------------------------

# (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M comes from default_config (rows per expert)
MOE_BENCH_TILES = ((32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (128, 128, 8, 4),
                   (32, 256, 4, 4))


def _time_ms(ctx: Ctx, fn) -> float:
    """Median ms of fn() (CUDA events via triton.testing.do_bench; on the CPU smoke run a few
    host-timed calls)."""
    if ctx.cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))
    fn()
    t = time.perf_counter()
    for _ in range(2):
        fn()
    return 1e3 * (time.perf_counter() - t) / 2


def section_moe_bench(ctx: Ctx) -> dict:
    """herd's Triton grouped MoE GEMM against torch._grouped_mm (bf16) / torch._scaled_grouped_mm
    (fp8) on Scout's expert shapes (16 experts; gate_up N=16384 K=5120, down N=5120 K=8192) at
    decode sizes (T tokens, top-1, uniform random routing): ms, the weight bytes of the experts that
    have rows over that time (GB/s), and each tile config's error against the torch kernel."""
    if not ctx.cuda and not ctx.smoke:
        return {"skipped": "needs CUDA (or --cpu-smoke)"}
    import torch

    from _gpu_models import collect
    from herd.ops.fp8 import FP8_DTYPE, quantize_per_token
    from herd.ops.triton.moe_gemm import MoeGemmConfig, default_config, moe_gemm

    E = 4 if ctx.smoke else 16
    shapes = {"w13": (64, 48), "w2": (48, 32)} if ctx.smoke else {"w13": (16384, 5120), "w2": (5120, 8192)}
    tokens = (1, 6) if ctx.smoke else (1, 16, 64, 256)
    tiles = MOE_BENCH_TILES[:2] if ctx.smoke else MOE_BENCH_TILES
    out: dict = {"experts": E, "shapes": {k: {"N": n, "K": kk} for k, (n, kk) in shapes.items()}, "rows": []}
    g = torch.Generator(device=ctx.device).manual_seed(0)
    for prec in ("bf16", "fp8"):
        scaled = prec == "fp8"
        if scaled and ctx.cuda and not hasattr(torch, "_scaled_grouped_mm"):
            out["rows"].append({"precision": prec, "skipped": "torch._scaled_grouped_mm is missing"})
            continue
        for which, (N, K) in shapes.items():
            w = (torch.randn(E, N, K, device=ctx.device, generator=g) * 0.02).to(torch.bfloat16)
            if scaled:
                w_scale = (w.float().abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
                wq = (w.float() / w_scale).to(FP8_DTYPE)
                del w
                b_scale = w_scale.reshape(E, N).contiguous()
            for T in tokens:
                if ctx.budget.spent():
                    out["rows"].append({"precision": prec, "proj": which, "T": T, "skipped": ctx.budget.note()})
                    continue
                x = torch.randn(T, K, device=ctx.device, generator=g).to(torch.bfloat16)
                ids = torch.sort(torch.randint(0, E, (T,), device=ctx.device, generator=g)).values
                counts = torch.zeros(E, dtype=torch.long, device=ctx.device).scatter_add_(0, ids, torch.ones_like(ids))
                offs = counts.cumsum(0).to(torch.int32)
                active = int((counts > 0).sum())
                if scaled:
                    xq, x_scale = quantize_per_token(x)
                    ref_fn = lambda: torch._scaled_grouped_mm(  # noqa: E731
                        xq, wq.transpose(-2, -1), x_scale.reshape(-1), b_scale, offs=offs, out_dtype=torch.bfloat16) \
                        if ctx.cuda else torch._grouped_mm(xq.float() * x_scale, (wq.float() * w_scale).transpose(-2, -1),
                                                           offs=offs).bfloat16()
                    run = lambda cfg: moe_gemm(xq, wq, offs, x_scale, w_scale, out_dtype=torch.bfloat16,  # noqa: E731
                                               config=cfg)
                    wbytes = active * N * K
                else:
                    ref_fn = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)  # noqa: E731
                    run = lambda cfg: moe_gemm(x, w, offs, config=cfg)  # noqa: E731
                    wbytes = active * N * K * 2
                row = {"precision": prec, "proj": which, "T": T, "active_experts": active, "weight_bytes": wbytes}
                try:
                    ref = ref_fn()
                    scale = float(ref.float().abs().max()) or 1.0
                    row["torch_ms"] = _time_ms(ctx, ref_fn)
                    row["torch_gb_s"] = wbytes / row["torch_ms"] / 1e6
                    cands = [None] + [MoeGemmConfig(default_config(T, E, N, K, scaled).block_m, *t) for t in tiles]
                    row["triton"] = []
                    for cfg in cands:
                        got = run(cfg)
                        err = float((got.float() - ref.float()).abs().max()) / scale
                        ms = _time_ms(ctx, lambda cfg=cfg: run(cfg))
                        row["triton"].append({"config": "default" if cfg is None else list(cfg), "ms": ms,
                                              "gb_s": wbytes / ms / 1e6, "rel_err": err,
                                              "ok": bool(torch.isfinite(got.float()).all()) and err <= 2e-2})
                    best = min((c for c in row["triton"] if c["ok"]), key=lambda c: c["ms"], default=None)
                    row["best"] = best and {"config": best["config"], "ms": best["ms"], "gb_s": best["gb_s"],
                                            "speedup_vs_torch": row["torch_ms"] / best["ms"]}
                    row["default_speedup_vs_torch"] = row["torch_ms"] / row["triton"][0]["ms"]
                    row["all_ok"] = all(c["ok"] for c in row["triton"])
                except SectionTimeout:
                    raise
                except Exception as e:  # noqa: BLE001
                    row.update(error_record(e))
                out["rows"].append(row)
                ctx.publish(out)
                if "error" in row:
                    log(f"  moe_bench {prec} {which} T{T}: {row['error']}")
                else:
                    log(f"  moe_bench {prec} {which} T{T}: torch {row['torch_ms']:.3f} ms, triton default "
                        f"{row['triton'][0]['ms']:.3f} ms, best {row['best'] and row['best']['config']} "
                        f"{row['best'] and round(row['best']['ms'], 3)} ms ({row['best'] and round(row['best']['gb_s'])} GB/s)"
                        f"{'' if row['all_ok'] else ' SOME CONFIGS WRONG'}")
            ref_fn = run = ref = None     # drop this projection's weights before the next one
            if scaled:
                del wq
            else:
                del w
            collect()
    ok_rows = [r for r in out["rows"] if "triton" in r]
    out["all_ok"] = bool(ok_rows) and all(r["all_ok"] for r in ok_rows)
    return out


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="where to write the JSON result (default gpu_check.json)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="global time budget; sections (and perf runs) left when it is spent are skipped")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on the CPU, Triton interpreted (tests this script without a GPU)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--perf-batches", default="1,16,64,256", help="decode batch sizes of the perf section")
    ap.add_argument("--perf-precisions", default=",".join(PERF_PRECISIONS),
                    help="the perf section's runs: bf16, fp8 (herd's default FP8 kernels), fp8-triton (herd's Triton "
                         "FP8 expert GEMM and per-token quantization: TRITON_FP8_MOE, TRITON_PER_TOKEN_QUANT)")
    ap.add_argument("--kernel-groups", default="reshape_and_cache,paged_attention,paged_decode,moe,fp8_quant",
                    help="which kernel parity groups the kernels section runs")
    ap.add_argument("--profile-batches", default="1,64",
                    help="decode batch sizes whose steps the perf section profiles (kernel time per step; '' = none)")
    ap.add_argument("--perf-layers", type=int, default=None, help="layer count of the perf model (default: fit)")
    ap.add_argument("--perf-mem-frac", type=float, default=0.6,
                    help="fraction of the GPU memory the perf model's BF16 weights may take")
    ap.add_argument("--in-process", action="store_true",
                    help="run the sections in this process (default: one child process per section, so that "
                         "a crash, a sticky CUDA error or a hang costs only that section)")
    # internal: one section in a child process
    ap.add_argument("--_section", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    ap.add_argument("--_deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--_precision", choices=PERF_PRECISIONS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def _write(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(clean(result), f)
        f.write("\n")
    os.replace(tmp, path)


def _smoke_env(env) -> None:
    """--cpu-smoke: set before torch / triton load (triton reads the interpreter flag on import)."""
    env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")    # tiny shapes; extra threads only thrash shared cores


def _on_alarm(signum, frame):
    raise SectionTimeout("the section ran past the time budget (+60 s grace)")


def run_section(name: str, args, budget: Budget, result_path: str | None) -> dict:
    """Run one section here; its errors (and a soft timeout at the deadline + 60 s) are recorded
    on top of what it had published."""
    import torch

    if args.cpu_smoke:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = None
    use_alarm = hasattr(signal, "SIGALRM")
    try:
        ctx = Ctx(args, budget, result_path)
        if use_alarm:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(budget.left(), 1) + 60)
        sec = globals()[f"section_{name}"](ctx)
    except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt too: keep what was measured)
        sec = {**(ctx.published if ctx else {}), **error_record(e)}
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    if result_path:
        _write(result_path, sec)
    return sec


def _die_with_parent() -> None:
    """Linux: the section process gets SIGTERM if the parent dies (no orphan left on the GPU)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))   # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 (best effort; other platforms)
        pass


def child_main(args) -> int:
    _die_with_parent()
    if args.cpu_smoke:
        _smoke_env(os.environ)
    with contextlib.redirect_stdout(sys.stderr):
        run_section(args._section, args, Budget(args.budget_s, args._deadline), args._result)
    return 0


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _child_section(name: str, args, budget: Budget, tmpdir: str, progress, extra=()) -> dict:
    """Run a section in a child process; a crash or a hang loses that section's unpublished part
    only. While it runs, its published partial result goes to progress(partial) every few seconds
    (so that --out holds it even if this whole command is killed)."""
    path = os.path.join(tmpdir, "-".join([name, *extra]).replace("--_", "") + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--_section", name, "--_result", path, *extra,
           "--_deadline", repr(budget.deadline), "--budget-s", repr(args.budget_s),
           "--perf-batches", args.perf_batches, "--perf-mem-frac", repr(args.perf_mem_frac),
           "--profile-batches", args.profile_batches, "--kernel-groups", args.kernel_groups,
           "--perf-precisions", args.perf_precisions]
    if args.perf_layers:
        cmd += ["--perf-layers", str(args.perf_layers)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    env = dict(os.environ, GPU_CHECK_T0=repr(T0))
    if args.cpu_smoke:
        _smoke_env(env)
    # env runs whatever the budget; the others get until the deadline, plus the soft timeout's
    # 60 s grace, plus 60 s more before the hard kill
    limit = 120.0 if name == "env" else max(budget.left(), 0) + 120
    start, seen, note = time.time(), None, None
    proc = subprocess.Popen(cmd, stdout=sys.stderr, env=env)
    while True:
        try:
            rc = proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            pass
        stamp = os.path.getmtime(path) if os.path.isfile(path) else None
        if stamp != seen:
            seen = stamp
            partial = _read_json(path)
            if partial is not None:
                progress({**partial, "running": f"partial result, {time.time() - start:.0f} s into the section"})
        if time.time() - start > limit:
            proc.kill()
            rc = proc.wait()
            note = f"the section process was killed after {limit:.0f} s (past the time budget)"
            break
    sec = _read_json(path) if os.path.isfile(path) else {}
    if sec is None:
        sec, note = {}, (note + "; " if note else "") + "unreadable result file"
    if rc != 0 and note is None:
        note = (f"the section process died of signal {-rc}" if rc < 0
                else f"the section process exited with status {rc}")
    if note:
        sec["error"] = sec["error"] + "; " + note if "error" in sec else note
    return sec


def _perf_per_precision(args, budget: Budget, tmpdir: str, result: dict) -> dict:
    """The perf section, one process per precision: each gets a clean GPU, and a crash or an OOM
    in one leaves the other's figures. The parts merge into one section with runs[precision]."""
    merged: dict = {"runs": {}}
    for prec in [p for p in PERF_PRECISIONS if p in args.perf_precisions.split(",")]:
        if budget.spent():
            merged["runs"][prec] = {"skipped": budget.note()}
            continue

        def progress(partial, prec=prec):
            result["sections"]["perf"] = _merge_perf(merged, partial, prec)
            _write(args.out, result)
        part = _child_section("perf", args, budget, tmpdir, progress, extra=("--_precision", prec))
        merged = _merge_perf(merged, part, prec)
        result["sections"]["perf"] = merged
        _write(args.out, result)
    return merged


def _merge_perf(merged: dict, part: dict, prec: str) -> dict:
    """merged + one precision's part: shared fields (model, settings, engine) from the first part
    that has them; the part's section-level error/skip goes to runs[prec]."""
    out = {**merged, "runs": dict(merged.get("runs", {}))}
    part = dict(part)
    run = dict(part.pop("runs", {}).get(prec, {}))
    for key in ("error", "traceback", "skipped", "running"):
        if key in part:
            run[key] = part.pop(key)
    part.pop("wall_s", None)
    for k, v in part.items():
        out.setdefault(k, v)
    out["runs"][prec] = run
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._section:
        return child_main(args)
    if args.cpu_smoke:
        _smoke_env(os.environ)
    budget = Budget(args.budget_s)
    result = {"check": "herd gpu_check", "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "budget_s": args.budget_s,
              "isolation": "in-process" if args.in_process else "one process per section", "sections": {}}
    wanted = [s for s in SECTIONS if s in args.sections.split(",")]
    tmpdir = tempfile.mkdtemp(prefix="gpu_check_")
    log(f"mode {result['mode']}, budget {args.budget_s:g} s, sections {wanted}")
    for name in wanted:
        if name != "env" and budget.spent():
            result["sections"][name] = {"skipped": budget.note()}
            log(f"{name}: {budget.note()}")
            continue
        log(f"section {name}")
        t = time.time()
        if args.in_process:
            with contextlib.redirect_stdout(sys.stderr):
                sec = run_section(name, args, budget, None)
        elif name == "perf":
            sec = _perf_per_precision(args, budget, tmpdir, result)
        else:
            def progress(partial, name=name):
                result["sections"][name] = partial
                _write(args.out, result)
            sec = _child_section(name, args, budget, tmpdir, progress)
        sec["wall_s"] = round(time.time() - t, 2)
        result["sections"][name] = sec
        log(f"section {name} done in {sec['wall_s']} s{': ' + sec['error'] if 'error' in sec else ''}")
        result["total_wall_s"] = round(time.time() - T0, 2)
        _write(args.out, result)
    result["wall_s_per_section"] = {k: v.get("wall_s") for k, v in result["sections"].items()}
    result["total_wall_s"] = round(time.time() - T0, 2)
    result["budget_exceeded"] = budget.spent()
    _write(args.out, result)
    log(f"wrote {args.out}")
    print(json.dumps(clean(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
