"""FP8 inference: ops reference, online FP8, compressed-tensors checkpoints, FP8 KV cache."""
import pytest
import torch

from herd import LLM, SamplingParams
from herd.cli import main
from herd.config import EngineConfig
from herd.model.loader import load_model
from herd.ops.fp8 import FP8_DTYPE, fp8_linear, fp8_linear_ref, quantize_per_token, quantize_weight
from herd.quant.methods import get_quant_methods


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_linear_matches_dequantized_reference():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 64, generator=g), torch.randn(48, 64, generator=g) * 0.1
    wq, ws = quantize_weight(w)
    assert wq.dtype == FP8_DTYPE and ws.shape == (48, 1)
    xq, xs = quantize_per_token(x)
    assert xs.shape == (9, 1)
    y = fp8_linear(x, wq, ws)
    assert torch.allclose(y, fp8_linear_ref(xq, xs, wq, ws, x.dtype))
    assert rel(y, x @ w.T) < 0.06  # E4M3 keeps 3 mantissa bits
    # a static input scale is honoured (a huge scale crushes the activations to zero)
    assert fp8_linear(x, wq, ws, torch.tensor([1e6])).abs().max() == 0


def logits(model, n=37):
    ids = torch.arange(3, 3 + n)
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(n)))


def quant_model(path, quantization=None):
    cfg = EngineConfig.from_kwargs(path, dtype="float32", quantization=quantization)
    return load_model(path, dtype=torch.float32, quant=get_quant_methods(cfg), config=cfg.model.hf_config)


def test_online_fp8_quantizes_linears_and_experts(scout_dir):
    ref = logits(load_model(scout_dir, dtype=torch.float32))
    model = quant_model(scout_dir, "fp8")
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == FP8_DTYPE
    assert layer.feed_forward.experts.w13_weight.dtype == FP8_DTYPE
    assert layer.feed_forward.router.weight.dtype == torch.float32  # router stays high precision
    out = logits(model)
    assert rel(out, ref) < 0.2
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.75


def test_compressed_tensors_checkpoint_loads_fp8(scout_dir, tmp_path):
    out_dir = str(tmp_path / "fp8")
    assert main(["quantize", "-m", scout_dir, "-o", out_dir, "--scheme", "fp8-dynamic"]) == 0
    cfg = EngineConfig.from_kwargs(out_dir, dtype="float32")
    assert cfg.quant.quantization == "compressed-tensors"  # detected from config.json
    model = quant_model(out_dir)
    base = load_model(scout_dir, dtype=torch.float32)
    experts = model.model.layers[1].feed_forward.experts
    assert experts.w13_weight.dtype == FP8_DTYPE
    deq = experts.w13_weight.float() * experts.w13_weight_scale
    assert rel(deq, base.model.layers[1].feed_forward.experts.w13_weight) < 0.05
    # the recipe keeps attention in the model dtype
    assert model.model.layers[1].self_attn.qkv_proj.weight.dtype == torch.float32
    ref, out = logits(base), logits(model)
    assert rel(out, ref) < 0.15
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    # and it generates through the engine
    llm = LLM(out_dir, dtype="float32", max_model_len=64, num_kv_blocks=16, block_size=4)
    o = llm.generate("The fox", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(o[0].outputs[0].token_ids) == 8


def test_fp8_kv_cache_close_to_model_dtype(scout_dir):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    kw = dict(dtype="float32", max_model_len=96, num_kv_blocks=32, block_size=4, enable_prefix_caching=False)
    base = LLM(scout_dir, **kw).generate("The fox jumps over", params, use_tqdm=False)[0].outputs[0]
    llm = LLM(scout_dir, kv_cache_dtype="fp8", **kw)
    assert llm.llm_engine.executor.runner.kv_caches[0][0].dtype == FP8_DTYPE
    out = llm.generate("The fox jumps over", params, use_tqdm=False)[0].outputs[0]
    # same first tokens; per-token logprobs of the base tokens stay close
    assert out.token_ids[:4] == base.token_ids[:4]
    for a, b in zip(out.logprobs[:4], base.logprobs[:4]):
        t = next(iter(b))
        assert abs(a[t].logprob - b[t].logprob) < 0.3


def test_fp8_weights_stay_fp8_in_memory(scout_dir):
    kw = dict(dtype="bfloat16", max_model_len=64, num_kv_blocks=8)
    base = LLM(scout_dir, **kw).llm_engine.executor.runner.weight_memory()
    fp8 = LLM(scout_dir, quantization="fp8", **kw).llm_engine.executor.runner.weight_memory()
    assert "float8_e4m3fn" in fp8 and "float8_e4m3fn" not in base
    assert sum(fp8.values()) < 0.75 * sum(base.values())
