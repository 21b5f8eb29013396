"""herd's own CPU kernels (C, built on first use, which load_model makes; see build.py),
registered as torch operators (`torch.ops.herd.*`, with fake kernels) so eager code and
torch.compile graphs call them alike.

cpu_grouped_gemm: torch._grouped_mm's contract (a [M, K] rows sorted by expert, w [E, N, K],
offs [E] int32 cumulative row ends; rows past offs[-1] left uninitialized) for fp32 or bf16
weights stored K-major (loader.relayout_for_cpu), activations of the same type. torch._grouped_mm
is the reference it is tested against. cpu_linear: F.linear(x, w) without bias for a K-major
[N, K] weight, the same kernel with one expert; used for decode-sized batches
(CPU_LINEAR_MAX_ROWS); for a row-major bf16 weight a row-streaming kernel (herd_gemv_rm, on the
CPU's bf16 dot-product instruction where it has one) up to gemv_rm_bf16_max_rows() rows. F.linear
is the reference of both. bf16 is computed in fp32 and rounded once.
cpu_paged_decode: one query token per sequence against its window of the paged KV cache (fp32
or bf16 caches, computed in fp32); the sdpa backend's gather + F.scaled_dot_product_attention is
its reference.

The operators are defined with torch.library.Library and a CPU implementation rather than
torch.library.custom_op: a call costs about 4 us instead of 35 us, which matters at batch 1 where
a step makes ~150 of them.
"""
from __future__ import annotations

import torch

from herd.ops.cpu.build import load_library

# Up to this many rows the kernel beats MKL on the measured decode shapes, weights from memory
# (1.3-2.9x at one row, 1.2-1.8x at 64, 1.0-1.6x at 128, 0.93-1.36x at 256: docs/benchmarks.md);
# larger inputs (prefill) go to F.linear.
CPU_LINEAR_MAX_ROWS = 256


@torch.compiler.assume_constant_result
def kernels_available() -> bool:
    """Built (or found in the cache) once per process; a constant to torch.compile."""
    return load_library() is not None


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the element types gemm.c is built for


def _takes(a_dtype: torch.dtype, w: torch.Tensor) -> bool:
    """fp32 or bf16 (activations and weights alike) on the CPU, the last two dims [N, K] stored
    K-major (any K row stride; the loader pads it, k_major_stride) with N a multiple of 16, and
    the kernels built on this machine."""
    return (w.device.type == "cpu" and a_dtype == w.dtype and w.dtype in _SUFFIX
            and w.stride(-2) == 1 and w.shape[-2] % 16 == 0 and kernels_available())


def cpu_grouped_gemm_supported(a_dtype: torch.dtype, w: torch.Tensor) -> bool:
    """Whether cpu_grouped_gemm takes these [E, N, K] weights (see _takes)."""
    return w.dim() == 3 and _takes(a_dtype, w)


@torch.compiler.assume_constant_result
def gemv_rm_bf16_max_rows() -> int:
    """Rows up to which the row-major bf16 kernel beats torch's bf16 GEMM here (gemm.c)."""
    lib = load_library()
    return lib.herd_gemv_rm_bf16_max_rows() if lib is not None else 0


def _takes_row_major(x: torch.Tensor, w: torch.Tensor) -> bool:
    """bf16 activations and a row-major bf16 weight (herd keeps bf16 dense linears row-major for
    F.linear) at decode sizes, where the row-major kernel beats torch's bf16 GEMM."""
    return (w.device.type == "cpu" and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and w.stride(-1) == 1 and x.numel() // max(1, x.shape[-1]) <= gemv_rm_bf16_max_rows())


def cpu_linear_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """x [..., K] with at most CPU_LINEAR_MAX_ROWS rows and a K-major weight [N, K] the kernel
    takes, or a row-major bf16 weight at the few rows the row-major kernel is for."""
    return (x.dim() >= 1 and x.numel() // max(1, x.shape[-1]) <= CPU_LINEAR_MAX_ROWS and w.dim() == 2
            and (_takes(x.dtype, w) or _takes_row_major(x, w)))


def cpu_paged_decode_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """fp32 or bf16 query and cache of the same type (no FP8 KV) on the CPU, head dim a multiple
    of 16 up to 256, at most 64 query heads (attention.c's limits)."""
    return (q.device.type == "cpu" and q.dtype in _SUFFIX and k_cache.dtype == q.dtype
            and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256 and q.shape[-2] <= 64 and k_cache.dim() == 4
            and k_cache.stride(-1) == 1 and kernels_available())


def k_major_stride(n: int, itemsize: int, line: int = 64) -> int:
    """Elements between consecutive K rows of a K-major weight with n columns: n rounded up to
    whole cache lines, plus one line where that makes an even number of lines. With a row stride
    of an even number of lines (a multiple of 4 KiB, say, as for 1024 or 2048 fp32 columns) the
    rows the kernels stream together map to a few cache sets and evict each other; an odd number
    of lines walks every set. The padding is never read."""
    per_line = max(1, line // itemsize)
    lines = -(-n // per_line)
    return (lines + (lines % 2 == 0)) * per_line


def k_major_storage(shape, itemsize: int) -> tuple[int, ...]:
    """The buffer behind a K-major [..., N, K] weight: [..., K, k_major_stride(N)]."""
    *lead, N, K = shape
    return (*lead, K, k_major_stride(N, itemsize))


def k_major_view(buf: torch.Tensor, n: int) -> torch.Tensor:
    """The [..., N, K] weight (last strides (1, k_major_stride)) in a k_major_storage buffer."""
    return buf[..., :n].transpose(-2, -1)


def k_major(w: torch.Tensor) -> torch.Tensor:
    """A copy of w [..., N, K] stored K-major as the loader stores it."""
    out = k_major_view(w.new_zeros(k_major_storage(w.shape, w.element_size())), w.shape[-2])
    out.copy_(w)
    return out


def _rows(a: torch.Tensor) -> torch.Tensor:
    return a if a.stride(-1) == 1 else a.contiguous()


def _check(rc: int, what: str):
    if rc != 0:
        raise RuntimeError(f"herd CPU kernel {what} failed (unsupported shape or out of memory)")


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    a, offs = _rows(a), offs.to(torch.int32).contiguous()
    M, K = a.shape
    E, N, _ = w.shape
    out = a.new_empty(M, N)
    _check(getattr(load_library(), "herd_grouped_gemm_" + _SUFFIX[a.dtype])(
        a.data_ptr(), a.stride(0), w.data_ptr(), w.stride(0), w.stride(2), out.data_ptr(), out.stride(0),
        offs.data_ptr(), E, N, K, torch.get_num_threads()), f"grouped GEMM (N={N})")
    return out


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    a = _rows(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]))
    N, K = w.shape
    out = a.new_empty(a.shape[0], N)
    if w.stride(-1) == 1:   # row-major (bf16 decode rows): one stream of whole weight rows per thread
        _check(getattr(load_library(), "herd_gemv_rm_" + _SUFFIX[a.dtype])(
            a.data_ptr(), a.stride(0), w.data_ptr(), w.stride(0), out.data_ptr(), N, a.shape[0], N, K,
            torch.get_num_threads()), f"row-major linear (N={N})")
        return out if x.dim() == 2 else out.view(*x.shape[:-1], N)
    _check(getattr(load_library(), "herd_linear_" + _SUFFIX[a.dtype])(
        a.data_ptr(), a.stride(0), w.data_ptr(), w.stride(1), out.data_ptr(), N, a.shape[0], N, K,
        torch.get_num_threads()), f"linear (N={N})")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], N)


def _paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, phys: torch.Tensor,
                  mask: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    dtype = q.dtype
    q = q.float()   # the kernel takes an fp32 query and gives an fp32 output for either cache type
    if q.stride(-1) != 1 or q.stride(1) != D:
        q = q.contiguous()
    if v_cache.stride() != k_cache.stride():
        raise RuntimeError("cpu_paged_decode needs K and V caches of the same layout")
    phys = phys.to(torch.int64).contiguous()
    m = mask.reshape(B, -1).contiguous().view(torch.uint8)
    out = q.new_empty(B, H, D)
    _check(getattr(load_library(), "herd_paged_decode_" + _SUFFIX[k_cache.dtype])(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), phys.data_ptr(), m.data_ptr(), out.data_ptr(), B, H, Hkv, D, phys.shape[1], bs,
        float(scale), torch.get_num_threads()), f"paged decode (H={H}, Hkv={Hkv}, D={D})")
    return out.to(dtype)


# The registration handle lives as long as the module (torch keeps the operators it defines).
_LIB = torch.library.Library("herd", "DEF")
_LIB.define("cpu_grouped_gemm(Tensor a, Tensor w, Tensor offs) -> Tensor")
_LIB.define("cpu_linear(Tensor x, Tensor w) -> Tensor")
_LIB.define("cpu_paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor phys, Tensor mask, float scale) -> Tensor")
_LIB.impl("cpu_grouped_gemm", _grouped_gemm, "CPU")
_LIB.impl("cpu_linear", _linear, "CPU")
_LIB.impl("cpu_paged_decode", _paged_decode, "CPU")


@torch.library.register_fake("herd::cpu_grouped_gemm", lib=_LIB)
def _(a, w, offs):
    return a.new_empty(a.shape[0], w.shape[1])


@torch.library.register_fake("herd::cpu_linear", lib=_LIB)
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.register_fake("herd::cpu_paged_decode", lib=_LIB)
def _(q, k_cache, v_cache, phys, mask, scale):
    return q.new_empty(q.shape)
