"""herd's CPU kernels (herd/ops/cpu) against the torch kernels they replace, on decode shapes.

Weights are cycled through several copies (more bytes than the 32 MiB L3) so each call reads
them from memory, as a decode step does; every figure is the best of --repeats timings, in one
run with the memory bandwidth measured alongside.

  dense    herd::cpu_linear (K-major weight) vs F.linear (torch, row-major weight): SmolLM2-135M's
           and the benchmark MoE's linear shapes at 1, 16, 64 rows; weight GB/s and GFLOP/s; in
           bf16 also herd's row-major kernel on the row-major weight ("bfloat16-rm", the layout
           herd keeps bf16 dense linears in) at the decode rows it is used for
  experts  herd::cpu_grouped_gemm vs torch._grouped_mm (both on K-major weights, as loaded),
           16 experts of the MoE checkpoint's shapes, top-1 routing of 1, 16, 64 tokens
  attention herd::cpu_paged_decode vs the sdpa backend's gather + SDPA: 8 query / 2 KV heads,
           head dim 64, windows of 256 keys in blocks of 128, batch 1, 16, 64

  dense and experts run for each of --dtypes (float32, bfloat16: weights and activations alike;
  torch's bf16 F.linear / grouped GEMM against herd's bf16 kernels).

    python benchmarks/cpu_kernels.py [--threads 2] [--repeats 20] [--dtypes float32 bfloat16]
        [--dense-rows 1 16 64] [--output-json FILE]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cpu_common import apply_threads, markdown_table, preset_threads, status, write_json  # noqa: E402

preset_threads()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from herd.ops.cpu import CPU_LINEAR_MAX_ROWS, gemv_rm_bf16_max_rows, k_major, kernels_available  # noqa: E402  (k_major: the loader's layout)
from membw import best_time, measure_bandwidth  # noqa: E402

COPY_BYTES = 96 << 20  # per shape, cycled: three times the L3


def best_ms(fn, repeats: int) -> float:
    return best_time(fn, repeats) * 1e3


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dense(repeats: int, dtype: torch.dtype, dense_rows=(1, 16, 64)) -> list[dict]:
    rows = []
    shapes = [("smollm2 qkv", 960, 576), ("smollm2 gate_up", 3072, 576), ("smollm2 down", 576, 1536),
              ("smollm2 lm_head", 49152, 576), ("moe shared gate_up", 2048, 512), ("moe qkv", 768, 512)]
    for name, N, K in shapes:
        copies = max(1, COPY_BYTES // (N * K * dtype.itemsize))
        ws = [(torch.randn(N, K) * K ** -0.5).to(dtype) for _ in range(copies)]
        wk = [k_major(w) for w in ws]
        # bf16 dense weights stay row-major: herd's row-major kernel up to gemv_rm_bf16_max_rows()
        # rows ("bfloat16-rm" rows), the K-major kernel as before otherwise
        cases = [(M, wk, str(dtype).split(".")[-1]) for M in dense_rows]
        if dtype == torch.bfloat16:
            cases[1:1] = [(M, ws, "bfloat16-rm") for M in range(1, gemv_rm_bf16_max_rows() + 1)]
        for M, herd_ws, label in cases:
            x = torch.randn(M, K).to(dtype)
            t_torch = best_ms(lambda: [F.linear(x, w) for w in ws], repeats) / copies
            t_herd = best_ms(lambda: [torch.ops.herd.cpu_linear(x, w) for w in herd_ws], repeats) / copies
            gb = N * K * dtype.itemsize / 1e9
            rows.append(dict(shape=f"{name} [{N}, {K}]", dtype=label, rows=M, torch_ms=t_torch, herd_ms=t_herd,
                             torch_gbps=gb / t_torch * 1e3, herd_gbps=gb / t_herd * 1e3,
                             herd_gflops=2 * M * N * K / t_herd / 1e6))
    return rows


def routed_experts(N: int, K: int, M: int, E: int, dtype: torch.dtype, seed: int):
    """M tokens routed top-1 at random (seeded) to E experts [N, K]: (a [M, K], offs, touched,
    weight copies) with the experts K-major as loaded, cycled through more bytes than the L3 (of
    the touched experts' bytes)."""
    g = torch.Generator().manual_seed(seed)
    ids, _ = torch.sort(torch.randint(0, E, (M,), generator=g))
    counts = torch.bincount(ids, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    touched = int((counts > 0).sum())
    copies = max(1, COPY_BYTES // (touched * N * K * dtype.itemsize))
    pool = k_major(torch.empty(copies * E, N, K).normal_(std=K ** -0.5).to(dtype))
    return torch.randn(M, K).to(dtype), offs, touched, [pool[c * E:(c + 1) * E] for c in range(copies)]


def experts(repeats: int, dtype: torch.dtype) -> list[dict]:
    rows, E = [], 16
    for name, N, K in (("w13", 2048, 512), ("w2", 512, 1024)):
        for M in (1, 16, 64):
            a, offs, touched, ws = routed_experts(N, K, M, E, dtype, seed=M)
            copies = len(ws)
            t_torch = best_ms(lambda: [torch._grouped_mm(a, w.transpose(-2, -1), offs=offs) for w in ws], repeats) / copies
            t_herd = best_ms(lambda: [torch.ops.herd.cpu_grouped_gemm(a, w, offs) for w in ws], repeats) / copies
            gb = touched * N * K * dtype.itemsize / 1e9
            rows.append(dict(shape=f"{name} 16 x [{N}, {K}]", dtype=str(dtype).split(".")[-1], tokens=M, experts_touched=touched,
                             torch_ms=t_torch, herd_ms=t_herd, torch_gbps=gb / t_torch * 1e3,
                             herd_gbps=gb / t_herd * 1e3))
            del ws
    return rows


def attention(repeats: int) -> list[dict]:
    rows = []
    H, Hkv, D, bs, W = 8, 2, 64, 128, 2
    for B in (1, 16, 64):
        nb = B * W + 1
        k_cache, v_cache = torch.randn(2, nb, bs, Hkv, D).unbind(0)
        q = torch.randn(B, H, D)
        phys = torch.arange(1, nb).view(B, W)
        mask = torch.ones(B, 1, 1, W * bs, dtype=torch.bool)

        def sdpa():
            kb = k_cache[phys].flatten(1, 2).transpose(1, 2)
            vb = v_cache[phys].flatten(1, 2).transpose(1, 2)
            return F.scaled_dot_product_attention(q[:, :, None, :], kb, vb, attn_mask=mask, scale=D ** -0.5,
                                                  enable_gqa=True)
        t_sdpa = best_ms(sdpa, repeats)
        t_herd = best_ms(lambda: torch.ops.herd.cpu_paged_decode(q, k_cache, v_cache, phys, mask, D ** -0.5), repeats)
        rows.append(dict(batch=B, keys=W * bs, sdpa_ms=t_sdpa, herd_ms=t_herd))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    ap.add_argument("--dense-rows", nargs="+", type=int, default=[1, 16, 64], metavar="M",
                    help="token rows of the dense linears (default 1 16 64; herd's kernel takes up to "
                         f"CPU_LINEAR_MAX_ROWS = {CPU_LINEAR_MAX_ROWS})")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    if not kernels_available():
        print("herd's CPU kernels could not be built here (no C compiler?)", file=sys.stderr)
        return 1
    status("memory bandwidth")
    bw = measure_bandwidth(args.threads)
    status(f"read bandwidth {bw['read_gbps']:.1f} GB/s; dense linears")
    d = [r for t in args.dtypes for r in dense(args.repeats, DTYPES[t], args.dense_rows)]
    status("grouped expert GEMMs")
    e = [r for t in args.dtypes for r in experts(args.repeats, DTYPES[t])]
    status("decode attention")
    a = attention(args.repeats)
    print(f"\nread bandwidth {bw['read_gbps']:.1f} GB/s ({args.threads} threads)\n")
    print(markdown_table(["shape", "dtype", "rows", "torch GB/s", "herd GB/s", "herd / torch", "herd GFLOP/s"],
                         [[r["shape"], r["dtype"], r["rows"], f"{r['torch_gbps']:.1f}", f"{r['herd_gbps']:.1f}",
                           f"{r['torch_ms'] / r['herd_ms']:.2f}x", f"{r['herd_gflops']:.0f}"] for r in d]))
    print()
    print(markdown_table(["experts", "dtype", "tokens", "touched", "torch GB/s", "herd GB/s", "herd / torch"],
                         [[r["shape"], r["dtype"], r["tokens"], r["experts_touched"], f"{r['torch_gbps']:.1f}",
                           f"{r['herd_gbps']:.1f}", f"{r['torch_ms'] / r['herd_ms']:.2f}x"] for r in e]))
    print()
    print(markdown_table(["batch", "keys", "gather + SDPA ms", "herd ms", "herd / SDPA"],
                         [[r["batch"], r["keys"], f"{r['sdpa_ms']:.3f}", f"{r['herd_ms']:.3f}",
                           f"{r['sdpa_ms'] / r['herd_ms']:.2f}x"] for r in a]))
    write_json(args.output_json, {"bandwidth": bw, "dense": d, "experts": e, "attention": a})
    return 0


if __name__ == "__main__":
    sys.exit(main())
