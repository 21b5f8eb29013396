"""FP8 one-shot quantizer and the compressed-tensors checkpoint format (read, write, interop)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from herd.cli import main as herd_main
from herd.quant.compressed_tensors import (
    CompressedCheckpoint,
    CompressedTensorsFP8Config,
    fuse_expert_tensors,
    load_compressed_checkpoint_tensors,
    quantize_checkpoint,
    read_compressed_config,
    split_fused_experts,
)
from herd.quant.compressed_tensors.calib import herd_to_hf_modules, measure_input_amax
from herd.quant.compressed_tensors.writer import expand_ignore
from herd.quant.observers import (
    SCALE_EPS,
    dequantize_fp8,
    fake_quantize_fp8,
    minmax_scale,
    mse_scale,
    quantize_fp8,
    quantize_weight,
    scale_from_amax,
    scale_from_minmax,
)
from tests.tiny_models import make_tiny_checkpoint

# ----------------------------------------------------------------------------- observer math


def test_scale_from_minmax_known_numbers():
    s = scale_from_minmax(torch.tensor([-2.0, 0.5, 0.0, -1.0]), torch.tensor([1.0, 3.0, 0.0, -0.25]))
    # |min'| vs max'; min' = min(min, 0) and max' = max(max, 0); all-zero -> float32 eps
    assert torch.equal(s, torch.tensor([2.0 / 448, 3.0 / 448, SCALE_EPS, 1.0 / 448]))
    assert torch.equal(scale_from_amax(896.0), torch.tensor([2.0]))
    assert scale_from_amax(3.0, torch.bfloat16).dtype == torch.bfloat16


def test_quantize_fp8_clamps_and_rounds_to_nearest_even():
    one = torch.tensor([1.0])
    x = torch.tensor([1.0625, 1.1875, 447.0, 500.0, -1e4, 0.0, 2.0 ** -9])
    q = quantize_fp8(x, one)
    assert q.dtype == torch.float8_e4m3fn
    # E4M3 has 3 mantissa bits: 1.0625 lies halfway 1.0|1.125 -> even 1.0; 1.1875 -> 1.25;
    # 447 rounds to 448; out-of-range values saturate instead of becoming NaN; 2^-9 is the smallest subnormal
    assert q.float().tolist() == [1.0, 1.25, 448.0, 448.0, -448.0, 0.0, 2.0 ** -9]
    s = torch.tensor([0.5])
    # -100 / 0.5 = -200 lies halfway 192|208 (step 16 in [128, 256)) -> even mantissa 192; 500 / 0.5 saturates
    assert dequantize_fp8(quantize_fp8(torch.tensor([3.0, -100.0, 500.0]), s), s).tolist() == [3.0, -96.0, 224.0]


def test_minmax_scale_channel_and_tensor():
    w = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.25, -0.1]])
    sc = minmax_scale(w, "channel")
    assert sc.shape == (2, 1) and torch.equal(sc, torch.tensor([[3.0 / 448], [0.5 / 448]]))
    st = minmax_scale(w, "tensor")
    assert st.shape == (1,) and torch.equal(st, torch.tensor([3.0 / 448]))
    with pytest.raises(ValueError):
        minmax_scale(w, "block")


def test_scale_is_computed_in_weight_dtype():
    w = torch.randn(8, 32).to(torch.bfloat16)
    q, s = quantize_weight(w, "channel", "minmax")
    assert s.dtype == torch.bfloat16 and q.dtype == torch.float8_e4m3fn
    amax = w.abs().amax(dim=1, keepdim=True)  # bf16
    assert torch.equal(s, amax / 448)  # the division happens in bf16, as llm-compressor does
    assert torch.equal(q, (w / s).clamp(-448, 448).to(torch.float8_e4m3fn))


def _mse_reference(w: torch.Tensor, grid=100, maxshrink=0.2, norm=2.4, patience=5) -> torch.Tensor:
    """Straight transcription of the spec, one channel at a time, errors in float64."""
    amax = [max(float(r.min().clamp(max=0).abs()), float(r.max().clamp(min=0))) for r in w]
    best_err = [float("inf")] * w.shape[0]
    best_p = [1.0] * w.shape[0]
    stale = 0
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        improved = False
        for c, row in enumerate(w):
            s = torch.tensor([max(p * amax[c] / 448, SCALE_EPS)], dtype=w.dtype)
            fq = (row / s).clamp(-448, 448).to(torch.float8_e4m3fn).to(w.dtype) * s
            err = float(((fq.double() - row.double()).abs() ** norm).sum())
            if err < best_err[c]:
                best_err[c], best_p[c], improved = err, p, True
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    return torch.tensor([[max(p * a / 448, SCALE_EPS)] for p, a in zip(best_p, amax)], dtype=w.dtype)


def test_mse_observer_matches_spec_transcription():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 512, generator=g)
    # row 0 sits exactly on the E4M3 grid of s = amax / 448: zero error at p = 1, so no shrink can win
    w[0] = torch.tensor([448.0, -256.0, 96.0, 3.5, 0.25, -13.0, 2.0 ** -9, 0.0] * 64) / 64
    w[1] *= 1e-3
    ref = _mse_reference(w)
    got = mse_scale(w, "channel")
    assert got.shape == (6, 1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    # Gaussian rows benefit from clipping a little: some channel must end below amax/448
    assert bool((got < minmax_scale(w) * 0.999).any())
    assert torch.equal(got[0], torch.tensor([1.0 / 64]))


def test_mse_observer_patience_stops_the_search():
    # 128 values on the E4M3 grid of the scale at p = 0.94, plus a max that p = 0.94 clips to 448:
    # p = 0.99 .. 0.95 are all worse than p = 1, so patience 5 stops before reaching the better 0.94
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid.abs() >= 16) & (grid.abs() < 448)]
    values = grid[torch.randint(len(grid), (128,), generator=torch.Generator().manual_seed(1))]
    row = torch.cat([values, torch.tensor([448.0 / 0.93])]).reshape(1, -1)
    amax = float(row.abs().max())
    assert torch.equal(mse_scale(row), torch.tensor([[amax / 448]]))
    assert torch.equal(mse_scale(row), _mse_reference(row))
    patient = mse_scale(row, patience=1000)
    assert float(patient) == pytest.approx(0.94 * amax / 448, rel=1e-6)
    assert torch.equal(patient, _mse_reference(row, patience=1000))


def test_mse_observer_never_worse_than_minmax():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(16, 256, generator=g) * torch.rand(16, 1, generator=g) * 4).to(torch.bfloat16)
    s_mse, s_mm = mse_scale(w, "channel"), minmax_scale(w, "channel")
    assert s_mse.dtype == torch.bfloat16

    def err(s):
        return (fake_quantize_fp8(w, s).float() - w.float()).abs().pow(2.4).sum(dim=1)

    assert bool((err(s_mse) <= err(s_mm)).all())
    assert bool((s_mse <= s_mm).all()) and bool((s_mse >= s_mm * 0.8).all())  # p in [0.81, 1]
    st = mse_scale(w, "tensor")
    assert st.shape == (1,)
    assert float(err(st.expand(16, 1)).sum()) <= float(err(minmax_scale(w, "tensor").expand(16, 1)).sum())


# ----------------------------------------------------------------------------- synthetic checkpoints

D, I, IM, E, V = 32, 48, 40, 3, 50  # non-square so a wrong transpose fails on shape


def _synthetic_tensors(multimodal: bool, dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)

    p = "language_model." if multimodal else ""
    t = {f"{p}model.embed_tokens.weight": r(V, D), f"{p}model.norm.weight": torch.ones(D, dtype=dtype),
         f"{p}lm_head.weight": r(V, D)}
    for i in range(2):
        L = f"{p}model.layers.{i}"
        t[f"{L}.input_layernorm.weight"] = torch.ones(D, dtype=dtype)
        t[f"{L}.post_attention_layernorm.weight"] = torch.ones(D, dtype=dtype)
        for n, rows in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16)):
            t[f"{L}.self_attn.{n}.weight"] = r(rows, D)
        t[f"{L}.self_attn.o_proj.weight"] = r(D, 32)
        if i == 0:  # dense layer (Maverick's even layers)
            t[f"{L}.feed_forward.gate_proj.weight"] = r(IM, D)
            t[f"{L}.feed_forward.up_proj.weight"] = r(IM, D)
            t[f"{L}.feed_forward.down_proj.weight"] = r(D, IM)
        else:
            t[f"{L}.feed_forward.router.weight"] = r(E, D)
            t[f"{L}.feed_forward.experts.gate_up_proj"] = r(E, D, 2 * I)
            t[f"{L}.feed_forward.experts.down_proj"] = r(E, I, D)
            for n, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
                t[f"{L}.feed_forward.shared_expert.{n}.weight"] = r(*shape)
    if multimodal:
        t["vision_model.patch_embedding.linear.weight"] = r(24, 12)
        t["vision_model.class_embedding"] = r(24)
        t["vision_model.model.layers.0.self_attn.q_proj.weight"] = r(24, 24)
        t["vision_model.model.layers.0.self_attn.q_proj.bias"] = r(24)
        t["vision_model.model.layers.0.mlp.fc1.weight"] = r(48, 24)
        t["multi_modal_projector.linear_1.weight"] = r(D, 24)
    return t


def _write_checkpoint(path, tensors: dict[str, torch.Tensor], shards: int = 1, multimodal: bool = False) -> str:
    os.makedirs(path, exist_ok=True)
    text = {"model_type": "llama4_text", "hidden_size": D, "intermediate_size": I, "intermediate_size_mlp": IM,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
            "num_local_experts": E, "moe_layers": [1], "vocab_size": V, "torch_dtype": "bfloat16"}
    cfg = ({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text}
           if multimodal else dict(text, architectures=["Llama4ForCausalLM"]))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        with open(os.path.join(path, side), "w") as f:
            f.write(json.dumps({"file": side}))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return str(path)
    weight_map = {}
    for k in range(shards):
        fn = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, os.path.join(path, fn))
        weight_map.update((n, fn) for n in part)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


@pytest.fixture(scope="module")
def mm_src(tmp_path_factory):
    tensors = _synthetic_tensors(multimodal=True)
    return _write_checkpoint(tmp_path_factory.mktemp("mm_src"), tensors, multimodal=True), tensors


@pytest.fixture(scope="module")
def mm_out(mm_src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mm_out") / "fp8")
    return out, quantize_checkpoint(mm_src[0], out, progress=False)


def _all_tensors(path: str) -> dict[str, torch.Tensor]:
    return dict(load_compressed_checkpoint_tensors(path))


# ----------------------------------------------------------------------------- writer / reader


def test_config_json_contents(mm_src, mm_out):
    out, result = mm_out
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(mm_src[0], "config.json")) as f:
        src_cfg = json.load(f)
    qc = cfg.pop("quantization_config")
    assert cfg == src_cfg  # everything else is preserved
    # the keys llm-compressor 0.14 (compressed-tensors 0.19) writes; both sort them (json sort_keys)
    args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    rest = {"block_structure": None, "actorder": None, "scale_dtype": None, "zp_dtype": None}
    assert qc == {
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**args, "strategy": "channel", **rest, "dynamic": False, "observer": "mse",
                        "observer_kwargs": {}},
            "input_activations": {**args, "strategy": "token", **rest, "dynamic": True, "observer": None,
                                  "observer_kwargs": {}},
            "output_activations": None, "format": "float-quantized"}},
        "format": "float-quantized", "global_compression_ratio": None, "ignore": result.ignored,
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.19.0",
    }
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert os.path.isfile(os.path.join(out, side))
    parsed = read_compressed_config(out)
    assert parsed.weight_strategy == "channel" and not parsed.is_static_input and not parsed.is_weight_only
    assert read_compressed_config(mm_src[0]) is None


def test_ignore_list_is_expanded_to_explicit_names(mm_src, mm_out):
    out, result = mm_out
    lm = "language_model.model.layers"
    expected = sorted(
        ["language_model.lm_head", f"{lm}.1.feed_forward.router", "multi_modal_projector.linear_1",
         "vision_model.model.layers.0.mlp.fc1", "vision_model.model.layers.0.self_attn.q_proj",
         "vision_model.patch_embedding.linear"]
        + [f"{lm}.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "k_proj", "v_proj", "o_proj")])
    assert sorted(result.ignored) == expected
    assert not any(p.startswith("re:") for p in read_compressed_config(out).ignore)
    assert expand_ignore(mm_src[0]) == result.ignored
    tensors = _all_tensors(out)
    for name in expected:  # kept as they were, without scales
        assert torch.equal(tensors[name + ".weight"], mm_src[1][name + ".weight"])
        assert name + ".weight_scale" not in tensors
    # non-Linear tensors pass through untouched (embedding, norms, biases, vision embeddings)
    for name in ("language_model.model.embed_tokens.weight", "vision_model.class_embedding",
                 "vision_model.model.layers.0.self_attn.q_proj.bias", "language_model.model.norm.weight"):
        assert torch.equal(tensors[name], mm_src[1][name])
    assert "language_model.model.embed_tokens.weight_scale" not in tensors
    quantized = {f"{lm}.0.feed_forward.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    quantized |= {f"{lm}.1.feed_forward.shared_expert.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    quantized |= {f"{lm}.1.feed_forward.experts.{e}.{n}" for e in range(E)
                  for n in ("gate_proj", "up_proj", "down_proj")}
    assert set(result.quantized) == quantized
    assert set(CompressedCheckpoint(out).quantized_modules()) == quantized


def test_roundtrip_error_bounds(mm_src, mm_out):
    out, result = mm_out
    src = mm_src[1]
    ckpt = CompressedCheckpoint(out)
    for mod in ckpt.iter_modules():
        if ".experts." in mod.name and ".shared_expert." not in mod.name:
            continue  # compared per expert in test_per_expert_split
        w = src[mod.name + ".weight"]
        assert mod.weight.dtype == torch.float8_e4m3fn and mod.weight.shape == w.shape
        assert mod.weight_scale.dtype == torch.bfloat16 and mod.weight_scale.shape == (w.shape[0], 1)
        assert mod.input_scale is None
        deq = mod.dequantize(torch.float32)
        rel = float((deq - w.float()).norm() / w.float().norm())
        assert 0 < rel < 0.04, (mod.name, rel)
        # the stored scale is the observer's scale for that weight
        assert torch.equal(mod.weight_scale, mse_scale(w, "channel"))


def test_minmax_roundtrip_per_element_bound(tmp_path, mm_src):
    out = str(tmp_path / "mm")
    quantize_checkpoint(mm_src[0], out, observer="minmax", progress=False)
    for mod in CompressedCheckpoint(out).iter_modules():
        if ".experts." in mod.name and ".shared_expert." not in mod.name:
            continue
        w = mm_src[1][mod.name + ".weight"].float()
        deq = mod.dequantize(torch.float32)
        s = mod.weight_scale.float()
        # 3 mantissa bits: half an ulp is 1/16 relative for normals, 2^-10 * s below the normal range;
        # plus the bf16 rounding of w / s before the cast
        bound = torch.maximum(w.abs() * (2 ** -4 + 2 ** -8), s * 2 ** -10) * 1.001
        assert bool(((deq - w).abs() <= bound).all()), mod.name
        assert torch.equal(mod.weight_scale.float(), w.abs().amax(1, keepdim=True).to(torch.bfloat16).div(448).float())


def test_per_expert_split(mm_src, mm_out):
    out, _ = mm_out
    src = mm_src[1]
    prefix = "language_model.model.layers.1.feed_forward.experts"
    gate_up, down = src[prefix + ".gate_up_proj"].float(), src[prefix + ".down_proj"].float()
    ckpt = CompressedCheckpoint(out)
    assert prefix + ".gate_up_proj" not in ckpt and prefix + ".down_proj" not in ckpt
    for e in range(E):
        gate, up, dn = (ckpt.module(f"{prefix}.{e}.{n}") for n in ("gate_proj", "up_proj", "down_proj"))
        assert gate.weight.shape == (I, D) and up.weight.shape == (I, D) and dn.weight.shape == (D, I)
        assert gate.weight_scale.shape == (I, 1) and dn.weight_scale.shape == (D, 1)
        for got, ref in ((gate, gate_up[e][:, :I].t()), (up, gate_up[e][:, I:].t()), (dn, down[e].t())):
            deq = got.dequantize(torch.float32)
            assert float((deq - ref).norm() / ref.norm()) < 0.04
            assert float((deq - ref).abs().max()) <= float(ref.abs().max()) * 0.2
    # the exact inverse: split then fuse gives the source tensors back bit for bit
    per_expert = list(split_fused_experts(prefix + ".gate_up_proj", src[prefix + ".gate_up_proj"]))
    per_expert += list(split_fused_experts(prefix + ".down_proj", src[prefix + ".down_proj"]))
    assert [n for n, _ in per_expert[:3]] == [f"{prefix}.0.gate_proj", f"{prefix}.0.up_proj", f"{prefix}.1.gate_proj"]
    fused = dict(fuse_expert_tensors(((n + ".weight", t) for n, t in per_expert), num_experts=E))
    assert torch.equal(fused[prefix + ".gate_up_proj"], src[prefix + ".gate_up_proj"])
    assert torch.equal(fused[prefix + ".down_proj"], src[prefix + ".down_proj"])


def test_dequantized_stream_and_fuse(mm_src, mm_out):
    out, _ = mm_out
    deq = dict(load_compressed_checkpoint_tensors(out, dequantize=True, dtype=torch.float32))
    assert not any(n.endswith(("weight_scale", "input_scale")) for n in deq)
    assert all(t.dtype != torch.float8_e4m3fn for t in deq.values())
    fused = dict(fuse_expert_tensors(deq.items()))
    assert set(fused) == set(mm_src[1])  # back to HF's fused naming
    for name, t in mm_src[1].items():
        assert fused[name].shape == t.shape
        assert float((fused[name].float() - t.float()).norm() / t.float().norm()) < 0.04


def test_sharded_input_and_output(tmp_path, mm_src, mm_out):
    src = _write_checkpoint(tmp_path / "sharded", mm_src[1], shards=3, multimodal=True)
    out = str(tmp_path / "out")
    result = quantize_checkpoint(src, out, max_shard_bytes=20_000, progress=False)
    assert len(result.shards) > 2
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == result.shards
    total = 0
    for fn in result.shards:
        with safe_open(os.path.join(out, fn), "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == fn
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert not [fn for fn in os.listdir(out) if fn.startswith(".shard")]
    a, b = _all_tensors(out), _all_tensors(mm_out[0])  # same content as from the single-file source
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
                                        if a[k].dtype == torch.float8_e4m3fn else torch.equal(a[k], b[k]) for k in a)


def test_failed_export_leaves_no_partial_shards(tmp_path, mm_src, monkeypatch):
    import herd.quant.compressed_tensors.writer as writer

    calls = []

    def failing(w, *args):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        return quantize_weight(w, *args)

    monkeypatch.setattr(writer, "quantize_weight", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_checkpoint(mm_src[0], str(out), max_shard_bytes=4000, progress=False)
    assert os.listdir(out) == []
    with pytest.raises(ValueError, match="observer"):
        quantize_checkpoint(mm_src[0], str(tmp_path / "o2"), observer="percentile", progress=False)


def test_custom_ignore_keeps_experts_per_expert(tmp_path, mm_src):
    out = str(tmp_path / "out")
    ignore = ["language_model.lm_head", "re:.*feed_forward\\.experts", "re:.*vision_model.*",
              "multi_modal_projector.linear_1", "re:nothing_matches"]
    result = quantize_checkpoint(mm_src[0], out, ignore=ignore, progress=False)
    prefix = "language_model.model.layers.1.feed_forward.experts"
    assert result.unused_ignore_patterns == ["re:nothing_matches"]
    assert f"{prefix}.2.down_proj" in result.ignored and "language_model.lm_head" in result.ignored
    assert "language_model.model.layers.0.self_attn.q_proj" in result.quantized  # attention now in FP8
    assert "language_model.model.layers.1.feed_forward.router" in result.quantized
    t = _all_tensors(out)
    assert t[f"{prefix}.2.down_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(t[f"{prefix}.2.down_proj.weight"], mm_src[1][prefix + ".down_proj"][2].t())
    assert read_compressed_config(out).is_ignored(f"{prefix}.0.gate_proj")


def test_static_fp8_scheme_input_scales(tmp_path):
    tensors = _synthetic_tensors(multimodal=False, dtype=torch.float32)
    src = _write_checkpoint(tmp_path / "src", tensors)
    with CompressedCheckpoint(src) as c:
        assert c.config is None
    from herd.quant.compressed_tensors.writer import SafetensorsFolder, linear_modules

    with SafetensorsFolder(src) as folder:
        modules = linear_modules(folder)
    amax = {m: 0.5 + i for i, m in enumerate(modules)}
    with pytest.raises(ValueError, match="needs activation amax"):
        quantize_checkpoint(src, str(tmp_path / "none"), scheme="fp8", progress=False)
    partial = dict(amax)
    partial.pop("model.layers.1.feed_forward.experts.1.down_proj")
    with pytest.raises(ValueError, match="experts.1.down_proj"):
        quantize_checkpoint(src, str(tmp_path / "partial"), scheme="fp8", input_amax=partial, progress=False)
    assert not os.listdir(tmp_path / "partial")  # failed before writing anything
    with pytest.raises(ValueError, match="finite and > 0"):
        zero = dict(amax, **{"model.layers.0.feed_forward.up_proj": 0.0})
        quantize_checkpoint(src, str(tmp_path / "zero"), scheme="fp8", input_amax=zero, progress=False)
    out = str(tmp_path / "out")
    result = quantize_checkpoint(src, out, scheme="fp8", input_amax=amax, observer="minmax", progress=False)
    cfg = read_compressed_config(out)
    assert cfg.is_static_input and cfg.weight_strategy == "tensor"
    assert cfg.input_activations.strategy == "tensor" and cfg.input_activations.observer == "static_minmax"
    ckpt = CompressedCheckpoint(out)
    for name in result.quantized:
        mod = ckpt.module(name)
        assert mod.weight_scale.shape == (1,) and mod.input_scale.shape == (1,)
        assert mod.input_scale.dtype == torch.float32
        assert torch.equal(mod.input_scale, torch.tensor([amax[name] / 448], dtype=torch.float32))
    w = tensors["model.layers.0.feed_forward.down_proj.weight"]
    scale = ckpt.module("model.layers.0.feed_forward.down_proj").weight_scale
    assert torch.equal(scale, w.abs().amax().reshape(1) / 448)


def test_config_detection_rules():
    assert CompressedTensorsFP8Config.from_config({"hidden_size": 8}) is None
    assert CompressedTensorsFP8Config.from_config({"quantization_config": {"quant_method": "fp8"}}) is None
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"],
                                        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                              "dynamic": True}},
                            "kv": {"targets": ["Llama4TextAttention"], "weights": None}},
          "ignore": ["lm_head", "re:.*self_attn", "re:.*router$"]}
    cfg = CompressedTensorsFP8Config.from_config({"compression_config": qc})  # legacy key
    assert cfg.weight_strategy == "channel" and not cfg.is_static_input
    assert cfg.is_ignored("lm_head") and not cfg.is_ignored("language_model.lm_head")  # exact names are exact
    assert cfg.is_ignored("model.layers.0.self_attn.q_proj")  # re: anchors at the start only (re.match)
    assert cfg.is_ignored("model.layers.3.feed_forward.router")
    assert not cfg.is_ignored("model.layers.3.feed_forward.router_x.y")
    assert cfg.is_quantized("model.layers.0.feed_forward.experts.1.gate_proj")
    int4 = json.loads(json.dumps(qc))
    int4["config_groups"]["group_0"]["weights"] = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}
    with pytest.raises(ValueError, match="FP8"):
        CompressedTensorsFP8Config.from_config({"quantization_config": int4})
    with pytest.raises(ValueError, match="format"):
        CompressedTensorsFP8Config.from_config({"quantization_config": dict(qc, format="pack-quantized")})


def test_herd_to_hf_module_names():
    assert herd_to_hf_modules("model.layers.3.self_attn.qkv_proj", "language_model.") == [
        "language_model.model.layers.3.self_attn.q_proj", "language_model.model.layers.3.self_attn.k_proj",
        "language_model.model.layers.3.self_attn.v_proj"]
    assert herd_to_hf_modules("model.layers.0.feed_forward.shared_expert.gate_up_proj") == [
        "model.layers.0.feed_forward.shared_expert.gate_proj", "model.layers.0.feed_forward.shared_expert.up_proj"]
    assert herd_to_hf_modules("model.layers.0.self_attn.o_proj") == ["model.layers.0.self_attn.o_proj"]
    assert herd_to_hf_modules("lm_head", "language_model.") == ["language_model.lm_head"]
    assert herd_to_hf_modules("model.layers.1.feed_forward.experts", num_experts=2)[3:] == [
        "model.layers.1.feed_forward.experts.1.gate_proj", "model.layers.1.feed_forward.experts.1.up_proj",
        "model.layers.1.feed_forward.experts.1.down_proj"]
    # dense Llama checkpoints call the FFN `mlp`
    assert herd_to_hf_modules("model.layers.2.feed_forward.gate_up_proj", ffn="mlp") == [
        "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"]
    assert herd_to_hf_modules("model.layers.2.self_attn.o_proj", ffn="mlp") == ["model.layers.2.self_attn.o_proj"]


def test_is_layer_skipped_for_herd_fused_modules(mm_out):
    cfg = read_compressed_config(mm_out[0])
    mm = "language_model."
    assert cfg.is_layer_skipped("model.layers.0.self_attn.qkv_proj", mm)
    assert cfg.is_layer_skipped("model.layers.1.feed_forward.router", mm)
    assert cfg.is_layer_skipped("lm_head", mm)
    assert not cfg.is_layer_skipped("model.layers.0.feed_forward.gate_up_proj", mm)
    assert not cfg.is_layer_skipped("model.layers.1.feed_forward.shared_expert.down_proj", mm)
    assert not cfg.is_layer_skipped("model.layers.1.feed_forward.experts", mm, num_experts=E)
    ignore = ["model.layers.0.self_attn.k_proj", "model.layers.1.feed_forward.experts.0.up_proj"]
    mixed = CompressedTensorsFP8Config(cfg.weights, cfg.input_activations, ["Linear"], ignore)
    with pytest.raises(ValueError, match="all quantized or all ignored"):
        mixed.is_layer_skipped("model.layers.0.self_attn.qkv_proj")
    with pytest.raises(ValueError, match="all quantized or all ignored"):
        mixed.is_layer_skipped("model.layers.1.feed_forward.experts", num_experts=2)


def test_cli(tmp_path, mm_src, capsys):
    out = str(tmp_path / "cli")
    rc = herd_main(["quantize", "-m", mm_src[0], "-o", out, "--scheme", "fp8-dynamic", "--observer", "minmax",
                    "--extra-ignore", "re:.*shared_expert", "re:nope", "--no-progress", "--max-shard-size", "8KB"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "ignore pattern 're:nope' matched no Linear module" in captured.err
    assert "re:.*vision_model" not in captured.err  # unused defaults are not reported
    cfg = read_compressed_config(out)
    assert cfg.weights.observer == "minmax"
    assert "language_model.model.layers.1.feed_forward.shared_expert.up_proj" in cfg.ignore
    assert len(CompressedCheckpoint(out).files) > 1
    # a non-empty output folder, or the static scheme without calibration data, are user errors
    assert herd_main(["quantize", "-m", mm_src[0], "-o", out, "--no-progress"]) == 2
    assert herd_main(["quantize", "-m", mm_src[0], "-o", str(tmp_path / "x"), "--scheme", "fp8"]) == 2
    assert herd_main(["quantize", "-m", out, "-o", str(tmp_path / "y"), "--no-progress"]) == 2  # already FP8
    assert "already quantized" in capsys.readouterr().err


# ----------------------------------------------------------------------------- interop with transformers


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """Maverick-like tiny Llama4ForCausalLM: dense layer 0, MoE layer 1 (4 experts)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf_tiny"), "maverick", num_hidden_layers=2)


@pytest.fixture(scope="module")
def hf_tiny_fp8(hf_tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf_tiny_fp8") / "fp8")
    quantize_checkpoint(hf_tiny, out, progress=False)
    return out


def _fake_quantized_reference(path: str):
    """transformers model whose quantized weights are replaced by dequant(quant(w)), computed
    from the source weights (fused experts split, quantized, put back), independent of the files."""
    from tests.tiny_models import load_hf

    model = load_hf(path)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and not any(k in name for k in ("lm_head", "self_attn", "router")):
                mod.weight.copy_(dequantize_fp8(*quantize_weight(mod.weight)))
            if type(mod).__name__ == "Llama4TextExperts":
                half = mod.gate_up_proj.shape[-1] // 2
                for e in range(mod.gate_up_proj.shape[0]):
                    for sl in (slice(0, half), slice(half, None)):
                        w = mod.gate_up_proj[e][:, sl].t()
                        mod.gate_up_proj[e][:, sl] = dequantize_fp8(*quantize_weight(w)).t()
                    mod.down_proj[e] = dequantize_fp8(*quantize_weight(mod.down_proj[e].t())).t()
    return model


PROMPT = torch.tensor([[1, 17, 33, 80, 5, 120, 64, 9]])
# transformers warns that the checkpoint's own quantization_config wins over the `dequantize` override
_OVERRIDE_WARNING = "ignore:You passed `quantization_config`"


@pytest.mark.filterwarnings(_OVERRIDE_WARNING)
def test_transformers_loads_dequantized_checkpoint(hf_tiny, hf_tiny_fp8):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from tests.tiny_models import load_hf

    ref = _fake_quantized_reference(hf_tiny)
    loaded = AutoModelForCausalLM.from_pretrained(
        hf_tiny_fp8, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    # transformers turns Llama4TextExperts into per-expert nn.Linear modules for compressed checkpoints
    assert type(loaded.model.layers[1].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    with torch.no_grad():
        lr, ll = ref(PROMPT).logits, loaded(PROMPT).logits
        lo = load_hf(hf_tiny)(PROMPT).logits
    torch.testing.assert_close(ll, lr, rtol=0, atol=1e-5)
    assert float((lo - lr).abs().max()) > 1e-3  # the reference really is quantized
    gen_ref = ref.generate(PROMPT, max_new_tokens=8, do_sample=False)
    gen = loaded.generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert gen.tolist() == gen_ref.tolist()


def test_compressed_tensors_runtime_sees_our_scheme(hf_tiny, hf_tiny_fp8):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_tiny_fp8, dtype=torch.float32).eval()
    expert = model.model.layers[1].feed_forward.experts[2].down_proj
    scheme = expert.quantization_scheme
    assert scheme.weights.strategy == "channel" and scheme.input_activations.dynamic
    assert expert.weight.dtype == torch.float8_e4m3fn  # kept compressed until the first forward
    assert getattr(model.model.layers[0].self_attn.q_proj, "quantization_scheme", None) is None  # ignored
    ours = CompressedCheckpoint(hf_tiny_fp8).module("model.layers.1.feed_forward.experts.2.down_proj")
    assert torch.equal(expert.weight.view(torch.uint8), ours.weight.view(torch.uint8))
    assert torch.equal(expert.weight_scale, ours.weight_scale)
    with torch.no_grad():
        model(PROMPT)  # decompresses; activations are fake-quantized per token by compressed-tensors
    ref = _fake_quantized_reference(hf_tiny).model.layers[1].feed_forward.experts.down_proj[2].t()
    assert torch.equal(expert.weight, ref)


@pytest.mark.filterwarnings(_OVERRIDE_WARNING)
def test_herd_loader_reads_dequantized_stream(hf_tiny_fp8):
    from transformers import AutoModelForCausalLM

    from herd.model.loader import load_model

    model = load_model(hf_tiny_fp8, dtype=torch.float32,
                       weights=load_compressed_checkpoint_tensors(hf_tiny_fp8, dequantize=True))
    up = CompressedCheckpoint(hf_tiny_fp8).module("model.layers.1.feed_forward.experts.3.up_proj")
    w13 = model.model.layers[1].feed_forward.experts.w13_weight
    assert torch.equal(w13[3, w13.shape[1] // 2:], up.dequantize())
    ids = PROMPT[0]
    with torch.no_grad():
        ours = model.compute_logits(model(ids, torch.arange(ids.numel())))
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from transformers import CompressedTensorsConfig

    hf = AutoModelForCausalLM.from_pretrained(
        hf_tiny_fp8, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, hf(PROMPT).logits[0], rtol=0, atol=1e-4)


def test_static_fp8_from_herd_calibration(hf_tiny, tmp_path):
    from herd.model.loader import load_model
    from tests.tiny_models import load_hf

    seqs = [[1, 17, 33, 80, 5, 120], [1, 200, 3, 4, 250, 11, 12, 13]]
    model = load_model(hf_tiny, dtype=torch.float32)
    amax = measure_input_amax(model, seqs, progress=False)
    # cross-check against the same activations seen by transformers' modules
    hf = load_hf(hf_tiny)
    seen: dict[str, float] = {}

    def hook(name):
        def fn(mod, args):
            x = args[0]
            if type(mod).__name__ == "Llama4TextExperts":  # [E * T, D], gated, zero rows for other experts
                per_e = x.reshape(mod.gate_up_proj.shape[0], -1, x.shape[-1]).abs().amax(dim=(1, 2))
                for e, v in enumerate(per_e.tolist()):
                    seen[f"{name}.{e}.gate_proj"] = max(seen.get(f"{name}.{e}.gate_proj", 0.0), v)
            else:
                seen[name] = max(seen.get(name, 0.0), float(x.abs().amax()))
        return fn

    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Llama4TextExperts":
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for s in seqs:
            hf(torch.tensor([s]))
    assert len(seen) > 10
    for name, v in seen.items():
        if v > 0:  # an expert that got no token reads 0 here; herd fills it from its layer's max
            assert amax[name] == pytest.approx(v, rel=1e-4, abs=1e-6), name
    assert amax["model.layers.0.self_attn.q_proj"] == amax["model.layers.0.self_attn.v_proj"]
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert amax[f"model.layers.1.feed_forward.experts.{e}.{proj}"] > 0
    out = str(tmp_path / "static")
    quantize_checkpoint(hf_tiny, out, scheme="fp8", input_amax=amax, progress=False)
    mod = CompressedCheckpoint(out).module("model.layers.0.feed_forward.gate_proj")
    assert torch.equal(mod.input_scale, scale_from_amax(amax["model.layers.0.feed_forward.gate_proj"]))
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    gate = loaded.model.layers[0].feed_forward.gate_proj
    assert not gate.quantization_scheme.input_activations.dynamic
    assert torch.equal(gate.input_scale.data, mod.input_scale)
    assert loaded.generate(PROMPT, max_new_tokens=4, do_sample=False).shape == (1, PROMPT.shape[1] + 4)


def test_cli_static_scheme_calibrates_with_herd(hf_tiny, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("The quick brown fox jumps over the lazy dog.\n\nMixture of experts routes each token.\n")
    out, saved = str(tmp_path / "static"), str(tmp_path / "amax.json")
    rc = herd_main(["quantize", "-m", hf_tiny, "-o", out, "--scheme", "fp8", "--calib-data", str(data),
                    "--save-input-amax", saved, "--observer", "minmax", "--no-progress"])
    assert rc == 0
    with open(saved) as f:
        amax = json.load(f)
    ckpt = CompressedCheckpoint(out)
    assert ckpt.config.is_static_input
    for name in ckpt.quantized_modules():
        assert amax[name] > 0
        assert torch.equal(ckpt.module(name).input_scale, scale_from_amax(amax[name]))
    # the precomputed-amax path gives the same files
    out2 = str(tmp_path / "static2")
    assert herd_main(["quantize", "-m", hf_tiny, "-o", out2, "--scheme", "fp8", "--input-amax", saved,
                      "--observer", "minmax", "--no-progress"]) == 0
    a, b = _all_tensors(out), _all_tensors(out2)
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_compressed_tensors_reads_our_config_as_written(mm_out):
    """compressed-tensors' own QuantizationConfig parses the block and keeps every value herd wrote
    (per-group format, scale_dtype / zp_dtype, strategies, dynamic flags, observers)."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.quantization import QuantizationConfig

    with open(os.path.join(mm_out[0], "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "float-quantized" and parsed.ignore == qc["ignore"]
    group = parsed.config_groups["group_0"]
    assert group.format == "float-quantized"
    for side in ("weights", "input_activations"):
        mine = qc["config_groups"]["group_0"][side]
        theirs = getattr(group, side)
        for key in ("num_bits", "symmetric", "group_size", "block_structure", "dynamic", "actorder",
                    "scale_dtype", "observer"):
            assert getattr(theirs, key) == mine[key], (side, key)
        assert (theirs.type, theirs.strategy) == (mine["type"], mine["strategy"])


# ----------------------------------------------------------------------------- tied embeddings


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny dense Llama whose lm_head is tied to the embedding (no lm_head tensor), like SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import save_tiny_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    path = str(tmp_path_factory.mktemp("tied") / "llama")
    model.eval().save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path)
    return path


def test_tied_lm_head_is_kept_in_the_ignore_list(tied_llama, tmp_path, capsys):
    out = str(tmp_path / "fp8")
    assert herd_main(["quantize", "-m", tied_llama, "-o", out, "--ignore", "lm_head", "--observer", "minmax",
                      "--no-progress", "--no-report"]) == 0
    assert "lm_head is tied" in capsys.readouterr().err
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["ignore"] == ["lm_head"]
    assert "lm_head.weight" not in _all_tensors(out) and "lm_head.weight_scale" not in _all_tensors(out)
    # no pattern names it: still listed, since herd never quantizes a tied head
    out2 = str(tmp_path / "fp8b")
    result = quantize_checkpoint(tied_llama, out2, ignore=["re:.*self_attn"], observer="minmax", progress=False)
    assert result.tied_lm_head == "lm_head" and result.ignored[-1] == "lm_head"


def test_transformers_generates_herds_tied_export_like_herd(tied_llama, tmp_path):
    """transformers + compressed-tensors load the export without a missing lm_head.weight_scale and
    generate what herd generates from the same files. With `ignore: []` (the bug) compressed-tensors
    would treat the tied head as a quantized Linear."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from transformers import AutoModelForCausalLM

    from herd import LLM, SamplingParams

    out = str(tmp_path / "fp8")
    quantize_checkpoint(tied_llama, out, ignore=["lm_head"], observer="minmax", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert getattr(hf.lm_head, "quantization_scheme", None) is None
    assert getattr(hf.model.layers[0].mlp.down_proj, "quantization_scheme", None) is not None
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    prompt = PROMPT[0].tolist()
    want = hf.generate(PROMPT, max_new_tokens=8, do_sample=False)[0, PROMPT.shape[1]:].tolist()
    llm = LLM(out, dtype="float32", max_model_len=64, num_kv_blocks=16, block_size=4, enable_prefix_caching=False)
    assert llm.llm_engine.config.quant.quantization == "compressed-tensors"
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) == want
    # the failure mode: the same tensors under `ignore: []` make compressed-tensors expect lm_head scales
    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    for fn in os.listdir(out):
        if fn != "config.json":
            os.symlink(os.path.join(out, fn), os.path.join(broken, fn))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["ignore"] = []
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(cfg, f)
    bad = AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32)
    assert getattr(bad.lm_head, "quantization_scheme", None) is not None


# ----------------------------------------------------------------------------- dense Llama names


def _load_with_quant(path: str):
    from herd.config import EngineConfig
    from herd.model.loader import load_model
    from herd.quant.methods import get_quant_methods

    cfg = EngineConfig.from_kwargs(path, dtype="float32", device="cpu")
    assert cfg.quant.quantization == "compressed-tensors"
    return load_model(path, dtype=torch.float32, quant=get_quant_methods(cfg), config=cfg.model.hf_config)


@pytest.mark.parametrize("pattern, kept", [
    ("model.layers.0.mlp.down_proj", {(0, "down_proj")}),
    ("re:.*mlp.*", {(i, p) for i in (0, 1) for p in ("gate_up_proj", "down_proj")}),
])
def test_ignore_names_dense_llama_mlp_as_the_checkpoint_does(tied_llama, tmp_path, pattern, kept):
    """Dense Llama checkpoints (and llm-compressor ignore lists) say `mlp` where herd's decoder says
    `feed_forward`: an ignored `mlp` module stays unquantized when herd loads the export."""
    out = str(tmp_path / "fp8")
    result = quantize_checkpoint(tied_llama, out, ignore=["lm_head", pattern], observer="minmax", progress=False)
    assert "model.layers.0.mlp.down_proj" in result.ignored
    model = _load_with_quant(out)
    with safe_open(os.path.join(tied_llama, "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(layer.feed_forward, proj).weight
            if (i, proj) in kept:
                assert w.dtype == torch.float32, (i, proj)
                if proj == "down_proj":
                    assert torch.equal(w, original[f"model.layers.{i}.mlp.down_proj.weight"])
            else:
                assert w.dtype == torch.float8_e4m3fn, (i, proj)
        assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    ids = PROMPT[0]
    with torch.no_grad():
        assert torch.isfinite(model.compute_logits(model(ids, torch.arange(ids.numel())))).all()


def test_static_fp8_calibration_names_dense_llama_mlp(tied_llama, tmp_path):
    """Calibrated input amax values are keyed by the checkpoint's module names (`mlp` on dense Llama),
    which the static `fp8` export looks them up by."""
    from herd.quant.compressed_tensors.calib import calibrate_input_amax

    amax = calibrate_input_amax(tied_llama, [PROMPT[0].tolist()], dtype=torch.float32, progress=False)
    assert {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"} <= set(amax)
    assert not any("feed_forward" in k for k in amax)
    out = str(tmp_path / "fp8")
    quantize_checkpoint(tied_llama, out, scheme="fp8", ignore=["lm_head"], input_amax=amax, observer="minmax",
                        progress=False)
    tensors = _all_tensors(out)
    assert float(tensors["model.layers.1.mlp.down_proj.input_scale"]) > 0
    assert _load_with_quant(out).model.layers[1].feed_forward.down_proj.input_scale.item() > 0
