"""INC flow end to end on a tiny checkpoint: herd calibrate (MEASURE) -> QUANTIZE with fp8_inc KV."""
import json
import math
import os

import numpy as np
import torch

from herd import LLM, SamplingParams
from herd.cli import main
from herd.ops.fp8 import FP8_DTYPE

ROWS = [{"system_prompt": "You are terse.", "question": q} for q in
        ["The fox jumps over the dog", "héllo wörld and naïve café", "Mixture of experts routes tokens",
         "In the beginning was the word", "llamas graze in the field", "the quick brown fox"]]


def test_calibrate_then_serve_static_fp8(scout_dir, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    out = tmp_path / "inc"
    assert main(["calibrate", "-m", scout_dir, "-d", str(data), "-o", str(out), "-b", "3",
                 "--max-model-len", "128", "--dtype", "float32"]) == 0
    root = out / os.path.basename(scout_dir).lower()
    quant_cfg = root / "maxabs_quant_cuda.json"
    prefix = json.loads(quant_cfg.read_text())["dump_stats_path"]
    meas = np.load(prefix + "_hooks_maxabs.npz", allow_pickle=True)["arr_0"].item()
    nodes = meas["Nodes"]
    qkv = nodes["model.layers.0.self_attn.qkv_proj"]
    assert qkv["inputs"][0][0][0] > 0 and qkv["params"]["weight"][0][0] > 0
    moe = nodes["model.layers.0.feed_forward.experts.moe_op"]
    assert len(moe["outputs"]) == 1 + 4 and moe["inputs"][0][0][0] > 0
    assert nodes["model.layers.0.self_attn.attn.impl.k_cache"]["inputs"][0][0][0] > 0
    assert len(nodes["model.layers.1.self_attn.o_proj"]["outputs"]) == 2  # row-parallel: 2 outputs
    assert json.loads((root / "cuda" / "inc_output_coverage.json").read_text())["layers"]

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(dtype="float32", max_model_len=96, num_kv_blocks=32, block_size=4, enable_prefix_caching=False)
    base = LLM(scout_dir, **kw).generate("The fox jumps over", params, use_tqdm=False)[0].outputs[0]
    llm = LLM(scout_dir, quantization="inc", quant_config_path=str(quant_cfg), kv_cache_dtype="fp8_inc", **kw)
    runner = llm.llm_engine.executor.runner
    layer = runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == FP8_DTYPE
    assert float(layer.self_attn.qkv_proj.input_scale) > 0
    assert layer.feed_forward.experts.w13_weight.dtype == FP8_DTYPE
    assert runner.kv_caches[0][0].dtype == FP8_DTYPE
    assert all(k != 1.0 for k, _ in runner.kv_scales)  # measured KV scales, not defaults
    outs = llm.generate("The fox jumps over", params, use_tqdm=False)[0].outputs[0]
    assert len(outs.token_ids) == 8 and all(math.isfinite(d[t].logprob) for t, d in zip(outs.token_ids, outs.logprobs))
    # the scale cache INC writes on first QUANTIZE is there
    assert os.path.exists(prefix + "_hooks_maxabs_MAXABS_HW.npz")
    # static FP8 stays close to the fp32 model (random tiny weights: FP8 noise, not a bias)
    ref_model = LLM(scout_dir, **kw).llm_engine.executor.runner.model
    ids = torch.arange(3, 40)
    with torch.no_grad():
        ref = ref_model.compute_logits(ref_model(ids, torch.arange(37)))
        got = runner.model.compute_logits(runner.model(ids, torch.arange(37)))
    assert ((got - ref).norm() / ref.norm()).item() < 0.3
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.7
    assert base.token_ids and outs.token_ids


def test_inc_needs_a_quant_config(scout_dir, monkeypatch):
    monkeypatch.delenv("QUANT_CONFIG", raising=False)
    try:
        LLM(scout_dir, quantization="inc", dtype="float32", max_model_len=64, num_kv_blocks=8)
    except ValueError as e:
        assert "QUANT_CONFIG" in str(e)
    else:
        raise AssertionError("expected a ValueError")
