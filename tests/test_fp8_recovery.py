"""FP8 accuracy recovery: GPTQ rounding, calibration Hessians, per-layer sensitivity and the bf16
layers `herd quantize` / `herd calibrate` keep (with the reasons in the report)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from herd.cli import main as herd_main
from herd.model.loader import load_model
from herd.quant.hessian import measure_hessians, measure_hessians_sequential
from herd.quant.observers import (dequantize_fp8, fake_quantize_input, gptq_round, minmax_scale, quantize_fp8,
                                  quantize_weight)
from herd.quant.sensitivity import keep_top, measure_layer_sensitivity, pick_sensitive
from tests.test_llama_dense import LLAMA_BASE, make_tiny_llama
from tests.tiny_models import save_tiny_tokenizer

# ----------------------------------------------------------------------------- GPTQ rounding


def _correlated_inputs(n=4096, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)  # inputs driven by a few shared factors, as real activations are
    return z @ torch.randn(8, dim, generator=g) + 0.1 * torch.randn(n, dim, generator=g)


def test_gptq_round_lowers_the_output_error_and_stays_on_the_fp8_grid():
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = x.T @ x / len(x)
    s = minmax_scale(w)
    nearest = dequantize_fp8(quantize_fp8(w, s), s)
    q = gptq_round(w, s, h)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    gptq = dequantize_fp8(q, s)
    err = lambda wq: float((x @ (w - wq).T).norm() / (x @ w.T).norm())  # noqa: E731
    assert err(gptq) < 0.7 * err(nearest)
    # the weight error itself grows: GPTQ trades it for the output error
    assert float((gptq - w).norm()) > float((nearest - w).norm())
    assert torch.equal(quantize_fp8(gptq, s), q)  # q * s are FP8 values under the same scale


def test_gptq_round_zero_inputs_and_bad_shapes():
    x = _correlated_inputs(dim=16)
    x[:, 3] = 0.0  # an input that is always zero: its weights never matter
    h = x.T @ x / len(x)
    w = torch.randn(4, 16)
    q = gptq_round(w, minmax_scale(w), h)
    assert torch.all(q.float()[:, 3] == 0)
    with pytest.raises(ValueError, match="does not match"):
        gptq_round(w, minmax_scale(w), h[:8, :8])


def test_quantize_weight_with_hessian_uses_gptq_and_keeps_the_scale():
    x = _correlated_inputs(dim=32)
    w = torch.randn(8, 32).to(torch.bfloat16)
    h = x.T @ x / len(x)
    q0, s0 = quantize_weight(w, "channel", "minmax")
    q1, s1 = quantize_weight(w, "channel", "minmax", hessian=h)
    assert torch.equal(s0, s1) and s1.dtype == torch.bfloat16
    assert not torch.equal(q0.float(), q1.float())


# ----------------------------------------------------------------------------- Hessians


def test_measure_hessians_maps_fused_inputs_to_hf_modules(tmp_path):
    path = make_tiny_llama(tmp_path / "m", "llama3")
    model = load_model(path, dtype=torch.float32)
    seqs = [[1, 5, 9, 33, 70, 2], [1, 100, 7]]
    seen = []
    hook = model.model.layers[1].feed_forward.down_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    H = measure_hessians(model, seqs, progress=False)
    hook.remove()
    x = torch.cat(seen)
    assert torch.allclose(H["model.layers.1.mlp.down_proj"], x.T @ x / len(x), atol=1e-5)
    # q/k/v share the fused qkv_proj's input, gate/up the gate_up_proj's; checkpoint names use `mlp`
    assert H["model.layers.0.self_attn.q_proj"] is H["model.layers.0.self_attn.v_proj"]
    assert H["model.layers.2.mlp.gate_proj"] is H["model.layers.2.mlp.up_proj"]
    assert H["model.layers.0.self_attn.o_proj"].shape == (64, 64)
    assert not any("lm_head" in n for n in H)


def _rtn(w, h):  # round to nearest on per-channel min-max scales (the Hessian is not needed)
    s = minmax_scale(w)
    return dequantize_fp8(quantize_fp8(w, s), s)


def test_sequential_hessians_are_measured_behind_the_quantized_layers(tmp_path):
    path = make_tiny_llama(tmp_path / "m", "llama3")
    model = load_model(path, dtype=torch.float32)
    seqs = [[1, 5, 9, 33, 70, 2], [1, 100, 7, 8]]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    H = measure_hessians(model, seqs, progress=False)
    calls = []
    rtn = lambda w, h: (calls.append(w.shape), _rtn(w, h))[1]  # noqa: E731
    S = measure_hessians_sequential(model, seqs, rtn, lambda n: True, progress=False)
    assert set(S) == set(H)
    # layer 0 sees the embeddings either way; every later layer sees the FP8 layers before it
    for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert torch.allclose(S[f"model.layers.0.{n}"], H[f"model.layers.0.{n}"], atol=1e-6)
    assert not torch.allclose(S["model.layers.1.self_attn.q_proj"], H["model.layers.1.self_attn.q_proj"], atol=1e-4)
    # one checkpoint module's rows at a time: q, k, v and gate, up separately
    q, kv, ffn = 64, 32, LLAMA_BASE["intermediate_size"]
    assert calls[:5] == [(q, 64), (kv, 64), (kv, 64), (64, 64), (ffn, 64)]
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # weights restored

    # the reference: layer 0 in FP8 by hand (rounded weights, per-token FP8 inputs), layer 1 measured
    layer0 = model.model.layers[0]
    linears = [layer0.self_attn.qkv_proj, layer0.self_attn.o_proj, layer0.feed_forward.gate_up_proj, layer0.feed_forward.down_proj]
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    hooks, seen = [], []
    for mod, n in zip(linears, names):
        h = H[f"model.layers.0.{n}"]
        rows = {"self_attn.q_proj": [q, kv, kv], "mlp.gate_proj": [ffn, ffn]}.get(n, [mod.weight.shape[0]])
        mod.weight.data = torch.cat([_rtn(r, h) for r in torch.split(mod.weight.data, rows)])
        hooks.append(mod.register_forward_pre_hook(lambda m, a: (fake_quantize_input(a[0]),)))
    hooks.append(model.model.layers[1].self_attn.qkv_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone())))
    for ids in seqs:
        model(torch.tensor(ids), torch.arange(len(ids)))
    for h in hooks:
        h.remove()
    x = torch.cat(seen)
    assert torch.allclose(S["model.layers.1.self_attn.q_proj"], x.T @ x / len(x), atol=1e-5)


def test_sequential_hessians_with_nothing_quantized_are_the_original_ones(tmp_path):
    path = make_tiny_llama(tmp_path / "m", "llama3")
    model = load_model(path, dtype=torch.float32)
    seqs = [[1, 5, 9, 33, 70, 2], [1, 100, 7]]
    H = measure_hessians(model, seqs, progress=False)
    S = measure_hessians_sequential(model, seqs, _rtn, lambda n: False, progress=False, activations="static")
    assert all(torch.allclose(S[n], H[n], atol=1e-6) for n in H)
    with pytest.raises(ValueError, match="activations"):
        measure_hessians_sequential(model, seqs, _rtn, lambda n: True, activations="per-channel")


def test_asymmetric_refit_fits_the_unquantized_outputs_from_fp8_inputs(tmp_path):
    path = make_tiny_llama(tmp_path / "m", "llama3")
    model = load_model(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    seqs = [[1] + torch.randint(3, 250, (40,), generator=g).tolist() for _ in range(8)]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    plain = measure_hessians_sequential(model, seqs, _rtn, lambda n: True, progress=False, activations="static")
    targets = {}
    S = measure_hessians_sequential(model, seqs, _rtn, lambda n: True, progress=False, activations="static",
                                    targets=targets)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # weights restored
    assert set(targets) == set(S) == set(plain)
    # layer 0's first Linear sees the embeddings in both models: W' is the damped least-squares fit
    # of W x from the statically quantized x, and its Hessian is that of the quantized inputs
    x = torch.cat([model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(s))) for s in seqs])
    w = model.model.layers[0].self_attn.qkv_proj.weight.detach()
    xq = fake_quantize_input(x, (x.abs().amax() / (448.0 * 0.25)).clamp(min=1e-12)).double()
    hq, c = xq.T @ xq / len(xq), x.double().T @ xq / len(xq)
    d = 0.01 * torch.diag(hq).mean()
    ref = torch.linalg.solve(hq + d * torch.eye(len(hq), dtype=hq.dtype), (w.double() @ c + d * w.double()).T).T
    q_rows = 4 * 16  # the tiny model's query rows; k and v follow
    assert torch.allclose(targets["model.layers.0.self_attn.q_proj"].double(), ref[:q_rows], atol=1e-5)
    assert torch.allclose(S["model.layers.0.self_attn.q_proj"].double(), hq, atol=1e-6)
    assert not torch.allclose(targets["model.layers.0.self_attn.q_proj"], w[:q_rows], atol=1e-4)
    # the fit: from the FP8 inputs, W' reproduces the unquantized outputs better than W does
    y = x.double() @ w.double().T
    assert (y - xq @ ref.T).norm() < 0.9 * (y - xq @ w.double().T).norm()

    # each Linear is measured behind the ones before it in the layer, already FP8 (refitted,
    # rounded, static inputs): down_proj's inputs come from the FP8 gate_up_proj, which was refitted
    # to the unquantized outputs itself; measured behind the unquantized one, down_proj's refit would
    # correct that drift a second time
    layer0 = model.model.layers[0]
    states = [model.model.embed_tokens(torch.tensor(s)) for s in seqs]
    hooks = []

    def inputs_of(mod):
        seen = []
        h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
        with torch.no_grad():
            for s, st in zip(seqs, states):
                layer0(torch.arange(len(s)), st, None)
        h.remove()
        return torch.cat(seen)

    parts = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "self_attn.o_proj": ["self_attn.o_proj"], "feed_forward.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"]}
    try:
        for herd_name, hf in parts.items():
            mod = layer0.get_submodule(herd_name)
            scale = (inputs_of(mod).abs().amax() / (448.0 * 0.25)).clamp(min=1e-12)
            mod.weight.data = torch.cat([_rtn(targets[f"model.layers.0.{n}"], None) for n in hf])
            hooks.append(mod.register_forward_pre_hook(lambda m, a, s=scale: (fake_quantize_input(a[0], s),)))
        x = inputs_of(layer0.feed_forward.down_proj)
        xq = fake_quantize_input(x, (x.abs().amax() / (448.0 * 0.25)).clamp(min=1e-12))
        assert torch.allclose(S["model.layers.0.mlp.down_proj"], xq.T @ xq / len(xq), atol=1e-5)
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(before)
    # nothing in FP8: nothing refitted and no Hessians (only FP8 Linears are measured here)
    none = {}
    assert measure_hessians_sequential(model, seqs, _rtn, lambda n: False, progress=False, activations="static",
                                       targets=none) == {}
    assert none == {}


# ----------------------------------------------------------------------------- sensitivity


def _amplify_layer(path, layer: int, factor: float = 10.0) -> None:
    """Make one decoder layer's MLP dominate the residual stream: its FP8 noise then dominates the
    output, and the later layers, whose outputs are small next to it, matter little."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors[f"model.layers.{layer}.mlp.down_proj.weight"] *= factor
    save_file(tensors, file, metadata={"format": "pt"})


def make_deep_llama(path, layers: int = 10, seed: int = 3) -> str:
    """A tiny dense Llama with enough decoder layers for `--bf16-layers auto` (a tenth of them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_BASE, "num_hidden_layers": layers, "tie_word_embeddings": True}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1) if "norm" in name else p.normal_(0, 0.08)
    model.eval().save_pretrained(str(path), safe_serialization=True)
    save_tiny_tokenizer(str(path))
    return str(path)


@pytest.fixture(scope="module")
def amplified(tmp_path_factory):
    path = make_deep_llama(tmp_path_factory.mktemp("sens") / "m")
    _amplify_layer(path, 0)
    return path


def _seqs():
    g = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(3, 320, (40,), generator=g).tolist() for _ in range(3)]


def test_sensitivity_scores_and_picks_the_dominant_layer(amplified):
    model = load_model(amplified, dtype=torch.float32)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    sens = measure_layer_sensitivity(model, _seqs(), lambda n: ".self_attn." not in n)
    assert [s.layer for s in sens.scores] == list(range(10))
    by_layer = {s.layer: s for s in sens.scores}
    assert by_layer[0].kl > 10 * max(s.kl for s in sens.scores[1:]) > 0
    # only the modules the recipe quantizes (attention is ignored here), as checkpoint names
    assert by_layer[0].modules == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                   "model.layers.0.mlp.down_proj"]
    assert by_layer[0].herd_modules == ["model.layers.0.feed_forward.gate_up_proj",
                                        "model.layers.0.feed_forward.down_proj"]
    pick_sensitive(sens)
    assert sens.keep == [0]
    assert "decoder layer 0" in sens.reason(0) and "x the median layer" in sens.reason(0)
    assert keep_top(sens, 2).keep[0] == 0 and len(sens.keep) == 2
    # the model is left as it was
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_sensitivity_passes_start_at_the_scored_layer(amplified, monkeypatch):
    # each layer's pass starts from the reference's input to that layer: the same scores as full
    # forwards (the layers before it compute the same thing either way), static activations included
    from herd.quant import sensitivity

    model = load_model(amplified, dtype=torch.float32)
    calls = []
    layer_forward = type(model.model.layers[0]).forward

    def counting(self, *args):
        calls.append(self)
        return layer_forward(self, *args)

    monkeypatch.setattr(type(model.model.layers[0]), "forward", counting)
    fast = {a: measure_layer_sensitivity(model, _seqs(), lambda n: ".self_attn." not in n, activations=a)
            for a in ("dynamic", "static")}
    n_layers, n_seqs = len(model.model.layers), len(_seqs())
    assert len(calls) == 2 * n_seqs * (n_layers + sum(n_layers - i for i in range(n_layers)))
    init = sensitivity._Passes.__init__

    def full_forwards(self, *args):
        init(self, *args)
        self.decoder = None

    monkeypatch.setattr(sensitivity._Passes, "__init__", full_forwards)
    calls.clear()
    for a, got in fast.items():
        full = measure_layer_sensitivity(model, _seqs(), lambda n: ".self_attn." not in n, activations=a)
        assert [s.kl for s in got.scores] == pytest.approx([s.kl for s in full.scores], rel=1e-4, abs=1e-9)
    assert len(calls) == 2 * n_seqs * n_layers * (n_layers + 1)


def _bos_massive_activation(path, layer: int = 0, dim: int = 5, channel: int = 7) -> None:
    """Give the BOS token (id 1) one huge MLP intermediate value in `layer`, as real models have
    (SmolLM2-135M: 3072 at layer 11's down_proj input, 300x any other token; here 7000x): BOS's embedding
    points along `dim`, which no other token uses and no layer writes, and one gate / up row of
    `layer` reads it strongly."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    emb = tensors["model.embed_tokens.weight"]
    emb[:, dim] = 0.0
    emb[1, dim] = 4.0 * emb[1].norm()
    for i in range(layer + 1):
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"][dim] = 0.0
        tensors[f"model.layers.{i}.mlp.down_proj.weight"][dim] = 0.0
    for proj in ("gate_proj", "up_proj"):
        tensors[f"model.layers.{layer}.mlp.{proj}.weight"][channel, dim] = 60.0
    save_file(tensors, file, metadata={"format": "pt"})


def test_static_sensitivity_sees_what_a_per_tensor_activation_scale_costs(tmp_path):
    # INC's static scales: one maxabs per linear input, set by BOS's huge value, leaves every other
    # token's inputs near FP8's subnormal range; per-token scales do not care
    path = make_deep_llama(tmp_path / "m")
    _bos_massive_activation(path, layer=4)
    model = load_model(path, dtype=torch.float32)
    dyn = measure_layer_sensitivity(model, _seqs(), lambda n: ".self_attn." not in n)
    static = measure_layer_sensitivity(model, _seqs(), lambda n: ".self_attn." not in n, activations="static")
    d, s = {x.layer: x.kl for x in dyn.scores}, {x.layer: x.kl for x in static.scores}
    assert s[4] > 5 * d[4]
    # elsewhere the two agree to within a few times (same weights, inputs without outliers)
    assert all(s[i] < 4 * d[i] + 1e-6 for i in d if i != 4)
    assert pick_sensitive(static).keep == [4]
    assert 4 not in pick_sensitive(dyn).keep
    # the spread of each linear's inputs: BOS's value makes layer 4's down_proj stand out; kept
    # alone when its layer is not (a whole-layer score can dilute it), never twice
    assert dyn.spreads == [] and pick_sensitive(dyn).keep_linears == []
    top = max(static.spreads, key=lambda x: x.ratio)
    assert top.module == "model.layers.4.feed_forward.down_proj" and top.hf_modules == ["model.layers.4.mlp.down_proj"]
    assert pick_sensitive(static).keep_linears == []
    alone = pick_sensitive(static, factor=1e9)
    assert alone.keep == [] and [x.module for x in alone.keep_linears] == ["model.layers.4.feed_forward.down_proj"]
    assert alone.kept_modules() == ["model.layers.4.mlp.down_proj"]
    assert alone.kept_modules(herd_names=True) == ["model.layers.4.feed_forward.down_proj"]
    assert "4.feed_forward.down_proj" in alone.format()
    with pytest.raises(ValueError, match="activations"):
        measure_layer_sensitivity(model, _seqs(), lambda n: True, activations="per-block")


def test_sensitivity_keeps_nothing_when_no_layer_stands_out(tmp_path):
    path = make_tiny_llama(tmp_path / "m", "llama3", seed=3)
    sens = measure_layer_sensitivity(load_model(path, dtype=torch.float32), _seqs(), lambda n: True)
    assert len(sens.scores) == 3 and all(s.kl > 0 for s in sens.scores)
    assert pick_sensitive(sens, factor=50.0, max_layers=3).keep == []
    assert pick_sensitive(sens, factor=0.0).keep == []  # 3 layers: a tenth of them is none


def test_auto_skips_models_with_few_layers(tmp_path, capsys):
    path = make_tiny_llama(tmp_path / "m", "llama3")
    assert herd_main(["quantize", "-m", path, "-o", str(tmp_path / "o"), "--no-progress", "--no-report"]) == 0
    assert "sensitivity" not in capsys.readouterr().out


def _write_calib(tmp_path) -> str:
    words = "the of and to in that was her not be with she he had it for as you his at".split()
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "calib.jsonl"
    with open(path, "w") as f:
        for _ in range(8):
            f.write(json.dumps({"text": " ".join(words[i] for i in torch.randint(0, len(words), (30,),
                                                                            generator=g))}) + "\n")
    return str(path)


def test_herd_quantize_keeps_the_sensitive_layer_in_bf16_and_says_why(amplified, tmp_path, capsys):
    out = tmp_path / "fp8"
    calib = _write_calib(tmp_path)
    assert herd_main(["quantize", "-m", amplified, "-o", str(out), "--no-progress", "--calib-data", calib,
                      "--rounding", "gptq"]) == 0
    text = capsys.readouterr().out
    assert "kept in bf16: decoder layer 0" in text and "GPTQ rounding for" in text
    with open(out / "config.json") as f:
        ignore = json.load(f)["quantization_config"]["ignore"]
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"} <= set(ignore)
    assert not any(".mlp." in n for n in ignore if not n.startswith("model.layers.0."))
    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype != torch.float8_e4m3fn
        assert f.get_tensor("model.layers.9.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
    with open(out / "quantization_report.json") as f:
        kept = json.load(f)["kept_bf16"]
    assert kept["model.layers.0.mlp.down_proj"].startswith("decoder layer 0: FP8 in this layer alone costs")
    assert kept["model.layers.0.self_attn.q_proj"] == "ignore list (re:.*self_attn)"


def test_herd_quantize_bf16_layers_none_and_nearest(amplified, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert herd_main(["quantize", "-m", amplified, "-o", str(out), "--no-progress", "--no-report",
                      "--bf16-layers", "none"]) == 0
    assert "kept in bf16: decoder layer" not in capsys.readouterr().out
    with open(out / "config.json") as f:
        ignore = json.load(f)["quantization_config"]["ignore"]
    assert not any(".mlp." in n for n in ignore)
    assert herd_main(["quantize", "-m", amplified, "-o", str(tmp_path / "g"), "--rounding", "gptq"]) == 2
    assert "--rounding gptq needs calibration text" in capsys.readouterr().err


def test_gptq_export_predicts_calibration_text_better_than_nearest(amplified, tmp_path):
    from herd.quant.accuracy_report import quantization_report
    from herd.quant.compressed_tensors.calib import load_calibration_sequences

    calib = _write_calib(tmp_path)
    errs = {}
    for label, extra in (("nearest", ["--rounding", "nearest"]), ("gptq", ["--rounding", "gptq"]),
                         ("sequential", ["--rounding", "gptq", "--gptq-inputs", "quantized"])):
        out = tmp_path / label
        assert herd_main(["quantize", "-m", amplified, "-o", str(out), "--no-progress", "--no-report",
                          "--bf16-layers", "none", "--calib-data", calib, "--ignore", "re:.*lm_head"] + extra) == 0
        tok_texts = [json.loads(line)["text"] for line in open(calib)]
        errs[label] = quantization_report(amplified, str(out), tok_texts).logits_rel_error
    assert load_calibration_sequences(calib, amplified, 2, 8)  # the text tokenizes
    assert errs["gptq"] < errs["nearest"] and errs["sequential"] < errs["nearest"]
    # sequential Hessians: the first layer sees the same inputs, the later ones those of FP8 layers
    gptq, seq = (load_file(str(tmp_path / n / "model-00001-of-00001.safetensors")) for n in ("gptq", "sequential"))
    assert torch.equal(gptq["model.layers.0.self_attn.q_proj.weight"], seq["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(gptq["model.layers.5.mlp.down_proj.weight"], seq["model.layers.5.mlp.down_proj.weight"])


def test_herd_calibrate_blocks_the_sensitive_layer(amplified, tmp_path):
    from herd.quant.inc.config import IncQuantConfig
    from herd.quant.inc.nodes import is_selected

    data = tmp_path / "rows.jsonl"
    with open(data, "w") as f:
        for i in range(4):
            f.write(json.dumps({"system_prompt": "You are helpful.", "question": f"Tell me about {i} cats"}) + "\n")
    out = tmp_path / "calib"
    assert herd_main(["calibrate", "-m", amplified, "-d", str(data), "-o", str(out), "--dtype", "float32",
                      "-b", "4", "--max-model-len", "256"]) == 0
    cfg = IncQuantConfig.from_json_file(out / os.path.basename(amplified).lower() / "maxabs_quant_cuda.json")
    assert not is_selected("model.layers.0.mlp.gate_up_proj", "MergedColumnParallelLinear", cfg)
    assert not is_selected("model.layers.0.self_attn.qkv_proj", "QKVParallelLinear", cfg)
    assert is_selected("model.layers.1.mlp.down_proj", "RowParallelLinear", cfg)
    assert is_selected("model.layers.0.mlp.down_proj_x", "RowParallelLinear", cfg)  # whole names only
    assert list(cfg.blocklist.names[-4:]) == [r"^model\.layers\.0\.self_attn\.qkv_proj(\.|$)",
                                   r"^model\.layers\.0\.self_attn\.o_proj(\.|$)",
                                   r"^model\.layers\.0\.mlp\.gate_up_proj(\.|$)",
                                   r"^model\.layers\.0\.mlp\.down_proj(\.|$)"]


def test_herd_calibrate_gptq_bakes_the_rounding_into_a_bf16_copy(amplified, tmp_path, capsys):
    from herd.quant.recovery import inc_pow2_channel_scale

    data = tmp_path / "rows.jsonl"
    with open(data, "w") as f:
        for i in range(6):
            f.write(json.dumps({"system_prompt": "You are helpful.", "question": f"Name {i} rivers of Europe"}) + "\n")
    out = tmp_path / "calib"
    args = ["calibrate", "-m", amplified, "-d", str(data), "-o", str(out), "--dtype", "float32", "-b", "6",
            "--max-model-len", "256", "--rounding", "gptq", "--blocklist-names", r"self_attn\.(qkv|o)_proj$"]
    assert herd_main(args) == 1  # the default per-tensor maxabs_hw scale would re-round the weights
    assert "per-channel power-of-two" in capsys.readouterr().err
    assert herd_main(args + ["--scale-method", "act_maxabs_hw_weights_pcs_maxabs_pow2"]) == 0
    rounded = out / os.path.basename(amplified).lower() / "gptq-bf16"
    printed = capsys.readouterr().out
    assert str(rounded) in printed  # the serve command names the rounded copy
    # chosen on the original weights, MLP only (attention is blocked anyway)
    assert "kept in bf16: decoder layer 0" in printed
    orig = load_file(os.path.join(amplified, "model.safetensors"))
    new = load_file(str(rounded / "model.safetensors"))
    assert set(orig) == set(new)
    name = "model.layers.5.mlp.down_proj.weight"
    assert not torch.equal(orig[name], new[name])
    # bf16 modules keep their weights: the norm, the blocked attention, the kept layer 0
    for n in ("model.norm.weight", "model.layers.5.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(orig[n], new[n]), n
    cfg = json.loads((out / os.path.basename(amplified).lower() / "maxabs_quant_cuda.json").read_text())
    assert r"self_attn\.(qkv|o)_proj$" in cfg["blocklist"]["names"]
    assert r"^model\.layers\.0\.mlp\.down_proj(\.|$)" in cfg["blocklist"]["names"]
    # INC's own per-channel power-of-two scale, computed from the rounded weight, gets it back exactly
    for n in (name, "model.layers.2.mlp.gate_proj.weight", "model.layers.9.mlp.up_proj.weight"):
        s = inc_pow2_channel_scale(new[n], 448.0)
        assert torch.equal(dequantize_fp8(quantize_fp8(new[n].float(), s), s), new[n].float()), n
    assert os.path.isfile(rounded / "config.json") and os.path.isfile(rounded / "tokenizer.json")
    # sequential Hessians by default: layer 1 follows an all-bf16 layer 0 (attention blocked, MLP
    # kept), so it sees the same inputs as in one pass over the original model; layer 5 follows
    # FP8 layers (rounded weights, static input scales)
    one_out = tmp_path / "calib-one-pass"
    one_args = args[:args.index("-o") + 1] + [str(one_out)] + args[args.index("-o") + 2:]
    assert herd_main(one_args + ["--scale-method", "act_maxabs_hw_weights_pcs_maxabs_pow2",
                                 "--gptq-inputs", "original"]) == 0
    one = load_file(str(one_out / os.path.basename(amplified).lower() / "gptq-bf16" / "model.safetensors"))
    assert torch.equal(one["model.layers.1.mlp.gate_proj.weight"], new["model.layers.1.mlp.gate_proj.weight"])
    assert not torch.equal(one[name], new[name])
    # asymmetric: refitted weights, still exactly on INC's grid; the bf16 modules keep theirs
    asym_out = tmp_path / "calib-asym"
    asym_args = args[:args.index("-o") + 1] + [str(asym_out)] + args[args.index("-o") + 2:]
    assert herd_main(asym_args + ["--scale-method", "act_maxabs_hw_weights_pcs_maxabs_pow2",
                                  "--gptq-inputs", "asymmetric"]) == 0
    asym = load_file(str(asym_out / os.path.basename(amplified).lower() / "gptq-bf16" / "model.safetensors"))
    for n in (name, "model.layers.1.mlp.gate_proj.weight", "model.layers.9.mlp.up_proj.weight"):
        assert not torch.equal(asym[n], new[n]), n
        s = inc_pow2_channel_scale(asym[n], 448.0)
        assert torch.equal(dequantize_fp8(quantize_fp8(asym[n].float(), s), s), asym[n].float()), n
    for n in ("model.norm.weight", "model.layers.5.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(orig[n], asym[n]), n
