"""herd's Triton MoE GEMM and FP8 quantization kernels compile for Hopper (sm90) without a GPU: Triton's wheel carries
ptxas, so a compile error, or a lost tensor-core path, shows up in CI before any GPU run. The
compile runs in a child process: the suite runs Triton interpreted (conftest), which a compile in
the same process cannot share."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPILE = r'''
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from herd.ops.triton.moe_gemm import FP8_PROMOTE_EVERY_K, _moe_gemm_kernel

def ptx(fp8, block_m, imprecise):
    dt = "fp8e4nv" if fp8 else "bf16"
    ints = ("N", "K", "stride_am", "stride_we", "stride_wn", "stride_cm", "stride_wse")
    sig = {"a_ptr": f"*{dt}", "w_ptr": f"*{dt}", "c_ptr": "*bf16", "offs_ptr": "*i32", "a_scale_ptr": "*fp32",
           "w_scale_ptr": "*fp32", **{n: "i32" for n in ints}}
    const = {"stride_ak": 1, "stride_wk": 1, "stride_cn": 1, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 256,
             "SCALED": fp8, "DOT_DTYPE": tl.float8e4nv if fp8 else tl.bfloat16, "MAX_IMPRECISE_ACC": imprecise}
    sig.update({n: "constexpr" for n in const})
    k = triton.compile(ASTSource(_moe_gemm_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 3})
    return k.asm["ptx"]

out = {}
for fp8 in (False, True):
    for bm in (16, 64):
        p = ptx(fp8, bm, FP8_PROMOTE_EVERY_K if fp8 else None)
        out[f"{'fp8' if fp8 else 'bf16'}-{bm}"] = {
            "mma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.[\w.]+|\bmma\.sync\.aligned\.[\w.]+", p))),
            "cvt": sorted(set(re.findall(r"cvt\.[\w.]+", p))), "f32_adds": len(re.findall(r"\badd(?:\.rn)?\.f32", p))}
out["fp8-64-imprecise"] = {"f32_adds": len(re.findall(r"\badd(?:\.rn)?\.f32", ptx(True, 64, None)))}

from herd.ops.triton.fp8_quant import _per_token_quant_kernel
sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "K": "i32", "stride_x": "i32", "stride_q": "i32",
       "BLOCK_K": "constexpr", "SOFT_FP8_ROUND": "constexpr"}
k = triton.compile(ASTSource(_per_token_quant_kernel, sig, {"BLOCK_K": 4096, "SOFT_FP8_ROUND": False}),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
p = k.asm["ptx"]
out["quant"] = {"div": sorted(set(re.findall(r"div\.[\w.]+f32", p))), "cvt": sorted(set(re.findall(r"cvt\.[\w.]+", p)))}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_decode_tiles_use_mma_sync(compiled):
    assert compiled["bf16-16"]["mma"] == ["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"]
    # FP8 at 16 rows: e4m3 widened exactly to f16, products accumulated in fp32
    assert "cvt.rn.f16x2.e4m3x2" in compiled["fp8-16"]["cvt"]
    assert compiled["fp8-16"]["mma"] == ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"]


def test_wide_tiles_use_warpgroup_mma(compiled):
    assert compiled["bf16-64"]["mma"] == ["wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"]
    assert compiled["fp8-64"]["mma"] == ["wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3"]


def test_fp8_quant_divides_correctly_rounded_and_casts_rtne(compiled):
    """The same quotients as torch: IEEE division (not div.approx), fp32 -> e4m3 round to nearest."""
    assert compiled["quant"]["div"] and all(d.startswith("div.rn") for d in compiled["quant"]["div"])
    assert any(c.startswith("cvt.rn.satfinite.e4m3x2.f32") for c in compiled["quant"]["cvt"])


def test_fp8_wgmma_partial_sums_are_promoted_to_fp32(compiled):
    """max_num_imprecise_acc makes the wgmma partial sums go into an fp32 accumulator every 128 K:
    more fp32 adds than Triton's sm90 default (2**30, fully in the tensor cores' accumulator)."""
    assert compiled["fp8-64"]["f32_adds"] > compiled["fp8-64-imprecise"]["f32_adds"]
