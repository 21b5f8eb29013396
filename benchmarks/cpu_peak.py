"""The CPU's fp32 FMA peak, for compute-bound roofline limits (the 16- and 64-row GEMMs of decode).

A loop of independent fused multiply-adds on vectors as wide as the machine's registers (AVX-512:
16 floats, else AVX2: 8), 24 accumulators so latency never limits it, compiled here with the
system C compiler (-O2 -march=native -fopenmp) and run on 1 thread and on --threads threads.
A large GEMM is not this limit: on the Zen 4 test machine torch's 2048^3 fp32 GEMM ran at 180
GFLOP/s (109 in an earlier measurement) against 226-233 measured here on 2 threads.

    python benchmarks/cpu_peak.py [--threads 2] [--output-json FILE]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cpu_common import status, write_json  # noqa: E402

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
#define CHAINS 24
typedef float vf __attribute__((vector_size(VL * 4)));
int main(int argc, char **argv) {
    const int threads = atoi(argv[1]);
    const long iters = atol(argv[2]);
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        float sink = 0;
        double t0 = omp_get_wtime();
        #pragma omp parallel num_threads(threads) reduction(+:sink)
        {
            vf acc[CHAINS], b, c;
            for (int i = 0; i < VL; i++) { b[i] = 1.0000001f; c[i] = 1e-7f; }
            #pragma GCC unroll 24
            for (int i = 0; i < CHAINS; i++) acc[i] = b * (float)i;
            for (long it = 0; it < iters; it++) {
                #pragma GCC unroll 24
                for (int i = 0; i < CHAINS; i++) acc[i] = acc[i] * b + c;
            }
            for (int i = 0; i < CHAINS; i++)
                for (int j = 0; j < VL; j++) sink += acc[i][j];
        }
        double gflops = 2.0 * VL * CHAINS * iters * threads / (omp_get_wtime() - t0) / 1e9;
        if (gflops > best) best = gflops;
        if (sink == 12345.f) printf("%f\n", sink);   /* keeps the loop */
    }
    printf("%d %.1f\n", VL, best);
    return 0;
}
"""


def measure(threads: int, iters: int = 20_000_000) -> tuple[int, float]:
    cc = next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)
    if cc is None:
        raise SystemExit("no C compiler found (cc / gcc)")
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "peak.c"), os.path.join(d, "peak")
        with open(src, "w") as f:
            f.write(SOURCE)
        # -ffp-contract=fast makes acc * b + c one FMA; nothing else is reassociated
        subprocess.run([cc, "-O2", "-march=native", "-fopenmp", "-ffp-contract=fast", src, "-o", exe],
                       check=True, capture_output=True)
        out = subprocess.run([exe, str(threads), str(iters)], check=True, capture_output=True, text=True)
    vl, gflops = out.stdout.split()[-2:]
    return int(vl), float(gflops)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)
    status(f"fp32 FMA peak: 1 and {args.threads} threads")
    vl, one = measure(1)
    _, many = measure(args.threads)
    print(f"fp32 FMA peak ({vl}-float vectors): {one:.1f} GFLOP/s on 1 thread, {many:.1f} on {args.threads}")
    if args.output_json:
        write_json(args.output_json, {"vector_floats": vl, "gflops_1_thread": one,
                                      f"gflops_{args.threads}_threads": many, "threads": args.threads})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
