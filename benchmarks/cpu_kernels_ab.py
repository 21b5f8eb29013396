"""herd's CPU GEMM kernels in this checkout against those of another git revision, interleaved in
one process: both builds are timed alternately on the same weights, round after round, and the
best round of each is kept. On a machine whose memory bandwidth moves between runs (VMs), this
is the comparison that survives; separate runs of benchmarks/cpu_kernels.py do not.

Shapes: the dense decode linears of SmolLM2-135M and the benchmark MoE checkpoint (1, 16 and 64
rows), and its experts (16 x w13 [2048, 512], w2 [512, 1024]; top-1 routing of 1, 16, 64
tokens), fp32, weights K-major as loaded and cycled through copies larger than the L3.

    python benchmarks/cpu_kernels_ab.py [--against HEAD] [--rounds 25] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cpu_common import REPO, apply_threads, markdown_table, preset_threads, status  # noqa: E402

preset_threads()

import torch  # noqa: E402

from cpu_kernels import routed_experts  # noqa: E402
from herd.ops.cpu import build  # noqa: E402

DENSE = [("smollm2 qkv", 960, 576), ("smollm2 o", 576, 576), ("smollm2 gate_up", 3072, 576),
         ("smollm2 down", 576, 1536), ("smollm2 lm_head", 49152, 576), ("moe qkv", 768, 512),
         ("moe shared gate_up", 2048, 512)]
EXPERTS = [("w13", 2048, 512), ("w2", 512, 1024)]


def checkout_sources(rev: str, folder: Path) -> None:
    for p in build.SOURCES + build.HEADERS:
        rel = p.relative_to(REPO).as_posix()
        text = subprocess.run(["git", "-C", REPO, "show", f"{rev}:{rel}"], check=True, capture_output=True,
                              text=True).stdout
        (folder / p.name).write_text(text)


def case(libs: dict, N: int, K: int, M: int, E: int, rounds: int) -> dict:
    a, offs, touched, ws = routed_experts(N, K, M, E, torch.float32, seed=M * N)
    copies, out = len(ws), torch.empty(M, N)
    ref = torch._grouped_mm(a, ws[0].transpose(-2, -1), offs=offs)
    threads = torch.get_num_threads()

    def call(lib, w):
        rc = lib.herd_grouped_gemm_f32(a.data_ptr(), K, w.data_ptr(), w.stride(0), w.stride(2), out.data_ptr(), N,
                                       offs.data_ptr(), E, N, K, threads)
        if rc:
            raise RuntimeError("kernel refused the shape")
    best = {}
    for name, lib in libs.items():
        call(lib, ws[0])
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)   # both builds compute the same thing
        best[name] = float("inf")
    for i in range(rounds):
        for name, lib in (list(libs.items()) if i % 2 else list(libs.items())[::-1]):   # alternate who goes first
            t = time.perf_counter()
            for w in ws:
                call(lib, w)
            best[name] = min(best[name], (time.perf_counter() - t) / copies)
    gb = touched * N * K * 4 / 1e9
    return {name: gb / t for name, t in best.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD", help="git revision whose kernels are the baseline")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        checkout_sources(args.against, base)
        status(f"building the kernels of {args.against} and of this checkout")
        here = build.SOURCES[0].parent
        libs = {args.against: build.build_from(base, Path(tmp) / "base.so"),
                "this checkout": build.build_from(here, Path(tmp) / "here.so")}
        rows = []
        shapes = [(f"{n} [{N}, {K}]", N, K, M, 1) for n, N, K in DENSE for M in (1, 16, 64)]
        shapes += [(f"experts {n} 16 x [{N}, {K}]", N, K, M, 16) for n, N, K in EXPERTS for M in (1, 16, 64)]
        for label, N, K, M, E in shapes:
            status(f"{label}, {M} rows")
            r = case(libs, N, K, M, E, args.rounds)
            old, new = r[args.against], r["this checkout"]
            rows.append([label, M, f"{old:.1f}", f"{new:.1f}", f"{new / old:.2f}x"])
    print()
    print(markdown_table(["shape", "rows", f"{args.against} GB/s", "this checkout GB/s", "ratio"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
