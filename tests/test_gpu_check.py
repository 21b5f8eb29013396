"""benchmarks/gpu_check.py must work the first time a GPU is lent: its --cpu-smoke mode runs every
section's code on tiny shapes (Triton interpreted, tiny models, eager) and must pass its own
checks and report every figure, without the packages the GPU machines lack."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Packages herd's server and formats use that the lent GPU machines' image does not have (nothing
# can be installed there): the GPU check must run without them.
NOT_ON_THE_GPU_IMAGE = ("fastapi", "uvicorn", "starlette", "pydantic", "pydantic_core", "gguf", "llguidance", "zmq")

BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("not on the GPU image: " + name)
sys.meta_path.insert(0, _Block())
"""


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(NOT_ON_THE_GPU_IMAGE)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    probe = subprocess.run([sys.executable, "-c", "import fastapi"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "not on the GPU image" in probe.stderr   # the blocker works
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--cpu-smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line == json.loads(out.read_text())
    sec = line["sections"]
    assert sec["env"]["mode"] == "cpu-smoke"
    summary = sec["kernels"]["summary"]
    assert summary["all_pass"] and summary["cases"] >= 30 and not summary["failed"], summary
    assert sec["graphs"]["all_pass"] and sec["graphs"]["cases"], sec["graphs"]
    for prec in ("bf16", "fp8", "fp8-triton"):
        run = sec["perf"]["runs"][prec]
        assert "error" not in run, run
        for row in run["decode"].values():
            assert row["decode_tok_s"] > 0 and row["decode_steps"] > 0, row
        assert run["prefill"]["prefill_tok_s"] > 0
        for prof in run["profile"].values():
            assert prof["steps"] > 0 and prof["top_kernels"], prof
    bench = sec["moe_bench"]
    assert bench["all_ok"] and len(bench["rows"]) == 8, bench
    for row in bench["rows"]:
        assert row["torch_ms"] > 0 and row["best"]["ms"] > 0 and row["active_experts"] >= 1, row
    assert not line["budget_exceeded"]
