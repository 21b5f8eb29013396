"""INC flow end to end on a tiny checkpoint: herd calibrate (MEASURE) -> QUANTIZE with fp8_inc KV."""
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
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
    meas = np.load(prefix + "_hooks_maxabs_0_1.npz", allow_pickle=True)["arr_0"].item()
    nodes = meas["Nodes"]
    qkv = nodes["model.layers.0.self_attn.qkv_proj"]
    assert qkv["inputs"][0][0][0] > 0 and qkv["params"]["weight"][0][0] > 0
    moe = nodes["model.layers.0.feed_forward.experts.moe_op"]
    assert len(moe["outputs"]) == 1 + 4 and moe["inputs"][0][0][0] > 0
    assert nodes["model.layers.0.self_attn.attn.impl.k_cache"]["inputs"][0][0][0] > 0
    assert len(nodes["model.layers.1.self_attn.o_proj"]["outputs"]) == 2  # row-parallel: 2 outputs
    assert json.loads((root / "cuda" / "inc_output_coverage.json").read_text())["layers"]
    # exactly the nodes INC selects in vLLM-HPU's Llama 4 under this config (recorded from INC)
    ref = json.loads((Path(__file__).parent / "data" / "inc_reference.json").read_text())["vllm_hpu_nodes"]["scout"]
    assert set(nodes) == set(ref["measured_herd_config"])
    mod_list = json.loads(Path(prefix + "_hooks_maxabs_0_1_mod_list.json").read_text())
    assert sorted(mod_list) == sorted(ref["mod_list_herd_config"])
    assert set(ref["measured_default"]) - set(nodes) == {
        f"model.layers.{i}.self_attn.attn.impl.{op}" for i in range(4)
        for op in ("batch2block_matmul", "block2batch_matmul", "fused_scaled_dot_product_attention")}
    assert nodes["lm_head"]["inputs"][0][0][0] > 0                          # measured, not 0.0
    impl = "model.layers.2.self_attn.attn.impl"
    qk, sm, av = (nodes[f"{impl}.{op}"] for op in ("matmul_qk", "softmax", "matmul_av"))
    assert qk["inputs"][0][0][0] > 0 and qk["inputs"][1][0][0] > 0 and sm["inputs"][0][0][0] > 0
    assert 0 < sm["outputs"][0][0][0] <= 1.0 and av["inputs"][0][0][0] == 1.0  # decodes: exp(s - max) <= 1
    # step 3: the K read back by matmul_qk uses the cache's measurement
    assert qk["inputs"][1][0][0] == nodes[f"{impl}.k_cache"]["inputs"][0][0][0]

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
    assert os.path.exists(prefix + "_hooks_maxabs_MAXABS_HW_CUDA_0_1.npz")
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


def _serve_command(out: str) -> tuple[str, int]:
    """(QUANT_CONFIG path, tensor parallel size) of the serve command `herd calibrate` prints."""
    m = re.search(r"QUANT_CONFIG=(\S+) herd serve \S+ --quantization inc --kv-cache-dtype fp8_inc "
                  r"--tensor-parallel-size (\d+)", out)
    assert m, out
    return m[1], int(m[2])


def _calibrate(scout_dir, tmp_path, capsys, *flags) -> tuple[str, int, str]:
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS[:4]))
    out = tmp_path / "inc"
    assert main(["calibrate", "-m", scout_dir, "-d", str(data), "-o", str(out), "-b", "2",
                 "--max-model-len", "96", "--dtype", "float32", *flags]) == 0
    cfg_path, tp = _serve_command(capsys.readouterr().out)
    return cfg_path, tp, json.loads(Path(cfg_path).read_text())["dump_stats_path"]


@pytest.mark.parametrize("measure_tp, target", [(2, 1), (1, 2)])
def test_unified_files_serve_with_the_printed_command(scout_dir, tmp_path, capsys, measure_tp, target):
    """`herd calibrate -t N -r R` in both directions (N = R is the test above): the printed command
    names R, and serving at R finds every rank's file (TP=1 spelled _0_1)."""
    cfg_path, tp, prefix = _calibrate(scout_dir, tmp_path, capsys, "-t", str(measure_tp), "-r", str(target))
    assert tp == target
    assert all(os.path.exists(f"{prefix}_hooks_maxabs_{r}_{target}.npz") for r in range(target))
    kw = dict(dtype="float32", max_model_len=64, num_kv_blocks=16, block_size=4, enable_prefix_caching=False)
    llm = LLM(scout_dir, quantization="inc", quant_config_path=cfg_path, kv_cache_dtype="fp8_inc",
              tensor_parallel_size=tp, **kw)
    try:
        out = llm.generate("The fox jumps over", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 4
    finally:
        llm.llm_engine.shutdown()
    assert all(os.path.exists(f"{prefix}_hooks_maxabs_MAXABS_HW_CUDA_{r}_{target}.npz") for r in range(target))


def test_vllm_hpu_measurement_with_attention_nodes_is_served(scout_dir, tmp_path, capsys):
    """A measurement as vLLM-HPU writes it at TP=1 (only the .npz, suffix _0_1, every attention op
    including the flat-PA batch2block / block2batch matmuls and fused SDPA) and calibrate_model.sh's
    QUANTIZE config without a blocklist: herd serves it with the file's KV-cache scales."""
    from herd.quant.inc import IncQuantConfig, Measurements, NodeStats, compute_scales

    _, _, herd_prefix = _calibrate(scout_dir, tmp_path, capsys)
    meas = Measurements.load(herd_prefix + "_hooks_maxabs_0_1.npz")
    for i in range(4):
        impl = f"model.layers.{i}.self_attn.attn.impl"
        meas.nodes[f"{impl}.batch2block_matmul"] = NodeStats([1.0, 3.5])
        meas.nodes[f"{impl}.block2batch_matmul"] = NodeStats([1.0, 2.25])
        meas.nodes[f"{impl}.fused_scaled_dot_product_attention"] = NodeStats([4.0, 3.0, 2.0], [1.5, 1.0])
    prefix = tmp_path / "hpu" / "g3" / "inc_output"
    prefix.parent.mkdir(parents=True)
    np.savez(f"{prefix}_hooks_maxabs_0_1.npz", meas.to_dict(as_numpy=True))
    none = {"types": [], "names": []}
    cfg_path = tmp_path / "hpu" / "maxabs_quant_g3.json"
    cfg_path.write_text(json.dumps({"mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_hw",
                                    "allowlist": none, "blocklist": none, "dump_stats_path": str(prefix)}))
    kw = dict(dtype="float32", max_model_len=64, num_kv_blocks=16, block_size=4, enable_prefix_caching=False)
    llm = LLM(scout_dir, quantization="inc", quant_config_path=str(cfg_path), kv_cache_dtype="fp8_inc", **kw)
    out = llm.generate("The fox jumps over", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4
    want = compute_scales(meas, IncQuantConfig.from_json_file(cfg_path)).nodes
    k0 = want["model.layers.0.self_attn.attn.impl.k_cache"].inputs[0]
    assert llm.llm_engine.executor.runner.kv_scales[0][0] == k0 != 1.0
    assert want["model.layers.0.self_attn.attn.impl.batch2block_matmul"].inputs[0] > 0   # every node has scales


def test_dense_llama_nodes_use_vllm_names(tmp_path, capsys):
    """Llama 1-3: vLLM calls the FFN `mlp`; herd's measurement uses those names (exactly the nodes INC
    selects in vLLM-HPU's LlamaForCausalLM, recorded), and QUANTIZE maps them back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import save_tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    path = str(tmp_path / "llama")
    model.eval().save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path)
    cfg_path, tp, prefix = _calibrate(path, tmp_path, capsys)
    nodes = np.load(prefix + "_hooks_maxabs_0_1.npz", allow_pickle=True)["arr_0"].item()["Nodes"]
    ref = json.loads((Path(__file__).parent / "data" / "inc_reference.json").read_text())["vllm_hpu_nodes"]["llama"]
    assert set(nodes) == set(ref["measured_herd_config"]) and "model.layers.1.mlp.down_proj" in nodes
    llm = LLM(path, quantization="inc", quant_config_path=cfg_path, dtype="float32", max_model_len=64,
              num_kv_blocks=16, block_size=4)
    ffn = llm.llm_engine.executor.runner.model.model.layers[1].feed_forward
    assert ffn.down_proj.weight.dtype == FP8_DTYPE and float(ffn.down_proj.input_scale) > 0


@pytest.mark.parametrize("method,inc_version,backoff", [("maxabs_pcs_pow2", "3.8.1", 0.5),
                                                        ("act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw", "3.8", 1.0)])
def test_dynamic_quantization_needs_no_measurements(scout_dir, tmp_path, method, inc_version, backoff):
    """vllm-gaudi's dynamic QUANT_CONFIG (no dump_stats_path, nothing measured): weights FP8 with
    the method's weight scales (PCS power of two, or one HW-aligned scale per tensor), activations
    scaled per token by powers of two with INC's backoff for its version (0.5 from 3.8.1, else
    1.0); the blocklist keeps its nodes in full precision and no KV cache is quantized."""
    from herd.ops.fp8 import quantize_per_token_pow2

    cfg = tmp_path / "dyn.json"
    cfg.write_text(json.dumps({"mode": "QUANTIZE", "observer": "maxabs", "scale_method": method,
                               "dynamic_quantization": True, "dump_stats_path": "", "inc_version": inc_version,
                               "blocklist": {"types": ["Matmul", "KVCache", "VLLMKVCache"],
                                             "names": ["self_attn.o_proj"]}}))
    kw = dict(dtype="float32", max_model_len=96, num_kv_blocks=32, block_size=4, enable_prefix_caching=False)
    llm = LLM(scout_dir, quantization="inc", quant_config_path=str(cfg), **kw)
    runner = llm.llm_engine.executor.runner
    layer = runner.model.model.layers[0]
    ref_layer = LLM(scout_dir, **kw).llm_engine.executor.runner.model.model.layers[0]
    qkv, ref_qkv = layer.self_attn.qkv_proj, ref_layer.self_attn.qkv_proj
    assert qkv.weight.dtype == FP8_DTYPE and not hasattr(qkv, "input_scale")
    s = qkv.weight_scale.reshape(-1)
    w = ref_qkv.weight.float()
    if method == "maxabs_pcs_pow2":   # per out channel: 2^ceil(log2(max|W_row| / (448 * 0.5)))
        assert torch.equal(s, torch.exp2(torch.ceil(torch.log2(w.abs().amax(1) / 224))))
    else:   # one scale per tensor, max|W| / (448 * 0.5); HW alignment is the identity on CUDA's E4M3
        assert s.unique().numel() == 1
        torch.testing.assert_close(s[0], w.abs().max() / 224)
    assert layer.self_attn.o_proj.weight.dtype == torch.float32                   # blocklisted
    assert layer.feed_forward.experts.w13_weight.dtype == FP8_DTYPE
    assert runner.kv_caches[0][0].dtype != FP8_DTYPE
    # the forward of a quantized linear is per-token power-of-two FP8 of its input times the FP8 weight
    x = torch.randn(5, w.shape[1]) * torch.tensor([1e-3, 1.0, 7.0, 300.0, 0.02])[:, None]
    xq, xs = quantize_per_token_pow2(x, backoff)
    assert torch.all(xs.log2() == xs.log2().round())
    peak = (x.abs().amax(1, keepdim=True) / xs)
    assert torch.all(peak <= 448 * backoff) and torch.all(peak > 224 * backoff)
    want = (xq.float() * xs) @ (qkv.weight.float() * qkv.weight_scale.float()).T
    torch.testing.assert_close(qkv(x), want, rtol=1e-5, atol=1e-5)
    # and the engine generates, close to the fp32 model
    ids = torch.arange(3, 40)
    ref_model = LLM(scout_dir, **kw).llm_engine.executor.runner.model
    with torch.no_grad():
        ref = ref_model.compute_logits(ref_model(ids, torch.arange(37)))
        got = runner.model.compute_logits(runner.model(ids, torch.arange(37)))
    assert ((got - ref).norm() / ref.norm()).item() < 0.3
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert len(llm.generate("The fox jumps over", params, use_tqdm=False)[0].outputs[0].token_ids) == 6
