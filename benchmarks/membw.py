"""CPU memory bandwidth with torch (and numpy), for roofline limits of decoding.

Each kernel runs over a buffer much larger than the last-level cache (default 1 GiB against a
32 MiB L3 here), warmed up once, then timed --repeats times; the best time is kept (other jobs
on a shared machine only ever slow a run down):

  sum        torch.sum over an fp32 buffer                  read bandwidth (--threads threads)
  amax       torch.amax over the same buffer                read bandwidth, a second reduction
  gemv       F.linear(x[1, K], W[N, K]) in fp32             the batch-1 decode access pattern
  copy       dst.copy_(src), counted as read + write        STREAM-style copy
  numpy_sum  numpy sum (one thread)                         a second opinion on read bandwidth
  gemv_bf16  F.linear in bf16 (same bytes as data)          how fast bf16 weights can be streamed

`read_gbps` (the max of sum, amax, gemv and numpy_sum) is the bandwidth the roofline ratios use.

    python benchmarks/membw.py [--threads 2] [--mib 1024] [--repeats 5] [--output-json FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cpu_common import apply_threads, preset_threads, status, write_json  # noqa: E402

preset_threads()


def best_time(fn, repeats: int) -> float:
    """Seconds: the best of `repeats` timed calls after one warm-up call."""
    fn()  # warm-up: page faults, thread pool start
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(threads: int = 2, mib: int = 1024, repeats: int = 5, bf16: bool = True) -> dict:
    """GB/s (1e9 bytes/s) of each kernel; see the module docstring."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    apply_threads(threads)
    n = (mib << 20) // 4
    K = 4096
    n -= n % K
    a = torch.ones(n, dtype=torch.float32)
    nbytes = a.numel() * 4
    out = {"threads": threads, "buffer_mib": nbytes >> 20, "repeats": repeats}
    out["sum_gbps"] = nbytes / best_time(lambda: a.sum(), repeats) / 1e9
    out["amax_gbps"] = nbytes / best_time(lambda: a.amax(), repeats) / 1e9
    w = a.view(-1, K)
    x = torch.ones(1, K)
    out["gemv_gbps"] = nbytes / best_time(lambda: F.linear(x, w), repeats) / 1e9
    b = torch.empty_like(a)
    out["copy_gbps"] = 2 * nbytes / best_time(lambda: b.copy_(a), repeats) / 1e9
    del b
    an = a.numpy()
    out["numpy_sum_gbps"] = nbytes / best_time(lambda: np.add.reduce(an), repeats) / 1e9
    if bf16:
        wb = w.to(torch.bfloat16)
        del w, a, an
        xb = x.to(torch.bfloat16)
        out["gemv_bf16_gbps"] = wb.numel() * 2 / best_time(lambda: F.linear(xb, wb), repeats) / 1e9
    out["read_gbps"] = max(out["sum_gbps"], out["amax_gbps"], out["gemv_gbps"], out["numpy_sum_gbps"])
    return out


def describe(bw: dict) -> str:
    keys = ("sum_gbps", "amax_gbps", "gemv_gbps", "copy_gbps", "numpy_sum_gbps", "gemv_bf16_gbps")
    parts = ", ".join(f"{k[:-5]} {bw[k]:.1f}" for k in keys if k in bw)
    return f"memory bandwidth GB/s ({bw['threads']} threads, {bw['buffer_mib']} MiB): {parts} -> read {bw['read_gbps']:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mib", type=int, default=1024, help="buffer size (keep it >> the L3 cache)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 GEMV")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    status(f"measuring memory bandwidth: {args.mib} MiB buffers, best of {args.repeats}, {args.threads} threads")
    bw = measure_bandwidth(args.threads, args.mib, args.repeats, not args.no_bf16)
    print(describe(bw))
    write_json(args.output_json, bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
