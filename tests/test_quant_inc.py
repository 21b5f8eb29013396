import argparse
import json
import pickle
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from herd.quant.inc import calibrate as cli
from herd.quant.formats import E4M3_GAUDI2, E4M3FN, ScaleDevice
from herd.quant.inc import (PRESETS, IncNode, IncQuantConfig, MeasurementCollector, Measurements, NodeNaming,
                            NodeScales, NodeStats, QuantConfigError, ScaleFile, ScaleMethod, activation_scale,
                            backup_existing, compute_scales, coverage_report, expand_experts, fill_cold_experts,
                            find_measurement_sets, format_coverage, herd_target, inc_nodes_for_module,
                            measurement_stem, node_scales, overlapping_ranks, postprocess, rank_stems,
                            scale_file_stem, scales_for_rank, unify, unify_files, weight_scale)

G2, G3, CUDA = ScaleDevice.GAUDI2, ScaleDevice.GAUDI3, ScaleDevice.CUDA
L0 = "model.layers.0"
MOE = f"{L0}.feed_forward.experts.moe_op"


def cfg(**kw) -> IncQuantConfig:
    return IncQuantConfig.from_dict(kw)


def rules(method: str, **kw):
    return cfg(scale_method=method, **kw).rules_for("x")


# ================================ QUANT_CONFIG ==================================================
def test_parse_spec_examples():
    m = cfg(method="HOOKS", mode="MEASURE", observer="maxabs", dump_stats_path="./hqt_output/measure")
    assert (m.mode, m.observer, m.dump_stats_path) == ("MEASURE", "maxabs", "./hqt_output/measure")
    assert m.extra == {"method": "HOOKS"}                       # unknown keys kept
    q = cfg(mode="QUANTIZE", observer="maxabs", scale_method="maxabs_hw", scale_format="SCALAR", use_qdq="True",
            quantize_weight=False, blocklist={"types": [], "names": ["matmul_qk", "matmul_av", "lm_head"]})
    assert q.method_name == "MAXABS_HW" and q.use_qdq is True and q.extra == {"quantize_weight": False}
    assert q.blocklist.names == ("matmul_qk", "matmul_av", "lm_head")
    d = cfg(mode="QUANTIZE", observer="maxabs", scale_format="CONST", dynamic_quantization=True,
            scale_method="act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw", dump_stats_path="")
    assert d.scale_method.dynamic and not d.needs_measurements and d.effective_scale_format == "CONST"


def test_defaults_and_case_rules():
    c = cfg()
    assert (c.mode, c.scale_method.name, c.measure_exclude, c.scale_format, c.hp_dtype, c.fp8_config) == \
        ("QUANTIZE", ScaleMethod.MAXABS_HW, "OUTPUT", "SCALAR", "BF16", "E4M3")
    # enum values are case-insensitive ...
    c = cfg(mode="measure", scale_method="Maxabs_Pow2", measure_exclude="none", hp_dtype="fp32", observer="MAXABS")
    assert (c.mode, c.method_name, c.measure_exclude, c.hp_torch_dtype) == ("MEASURE", "MAXABS_POW2", "NONE",
                                                                            torch.float32)
    # ... keys are not: "Mode" is an unknown key and the default mode stays
    c = cfg(Mode="MEASURE")
    assert c.mode == "QUANTIZE" and c.extra == {"Mode": "MEASURE"}


def test_legacy_list_names_and_pcs_forces_const():
    c = cfg(whitelist={"types": ["RowParallelLinear"]}, blacklist={"names": ["lm_head"]},
            scale_method="act_maxabs_hw_weights_pcs_maxabs_pow2")
    assert c.allowlist.types == ("RowParallelLinear",) and c.blocklist.names == ("lm_head",)
    assert c.effective_scale_format == "CONST"


@pytest.mark.parametrize("raw, message", [
    ({"mode": "CALIBRATE"}, "invalid mode"),
    ({"observer": "save"}, "implements only 'maxabs'"),
    ({"observer": "minmax"}, "invalid observer"),
    ({"scale_method": "maxabs_hwx"}, "unknown scale_method"),
    ({"allowlist": {"type": ["Linear"]}}, "unknown key"),
    ({"blocklist": {"names": ["("]}}, "bad regular expression"),
    ({"blocklist": {"names": "lm_head"}}, "list of strings"),
    ({"allowlist": {}, "whitelist": {}}, "not both"),
    ({"scale_method": "maxabs_pcs_pow2"}, "needs \"dynamic_quantization\": true"),
    ({"dynamic_quantization": True}, "needs a dynamic scale_method"),
    ({"dynamic_quantization": True, "mode": "MEASURE", "scale_method": "maxabs_pcs_pow2"}, "QUANTIZE/LOAD"),
    ({"dynamic_quantization": True, "use_qdq": True, "scale_method": "maxabs_pcs_pow2"}, "use_qdq"),
    ({"mod_dict": {"A": "linear"}}, "mod_dict must be empty"),
    ({"calibration_sample_interval": -1}, "calibration_sample_interval"),
    ({"scale_params": {"input_backoff": 0}}, "positive number"),
    ({"use_qdq": "maybe"}, "true or false"),
    ({"device_for_scales": "GAUDI4"}, "GAUDI2, GAUDI3 or CUDA"),
    ({"fp8_config": "E3M4"}, "invalid fp8_config"),
    ({"dump_stats_path": 3}, "dump_stats_path must be a string"),
    ({"inc_version": "three"}, "inc_version"),
])
def test_config_errors(raw, message):
    with pytest.raises(QuantConfigError, match=message):
        IncQuantConfig.from_dict(raw)


def test_config_file_errors(tmp_path):
    with pytest.raises(QuantConfigError, match="not found"):
        IncQuantConfig.from_json_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{mode: MEASURE")
    with pytest.raises(QuantConfigError, match="not valid JSON"):
        IncQuantConfig.from_json_file(bad)
    bad.write_text(json.dumps({"mode": "X"}))
    with pytest.raises(QuantConfigError, match=str(bad)):
        IncQuantConfig.from_json_file(bad)


def test_scale_method_dict_form():
    sm = {"default": {"weight": {"rounding_method": "hw_aligned", "backoff": 0.5},
                      "activation": {"rounding_method": "HW_ALIGNED", "backoff": 0.25}},
          "nodes": {f"{L0}.self_attn.o_proj": {"activation": {"backoff": 0.125}}},
          "layers": {"3": {"weight": {"granularity": "PCS", "rounding_method": "POW2"},
                           "activation": {"rounding_method": "POW2"}}},
          "layer_types": {"MoeMatmul": {"weight": {"scale_value_type": "OPT"}}}}
    c = cfg(scale_method=sm)
    assert c.scale_method.from_dict and c.method_name == "MAXABS_HW"
    w, a, _ = c.rules_for(f"{L0}.self_attn.o_proj", "RowParallelLinear")
    assert (w.backoff, a.backoff, a.rounding.name) == (0.5, 0.125, "HW_ALIGNED")   # node override inherits
    w, a, _ = c.rules_for("model.layers.3.self_attn.qkv_proj", "QKVParallelLinear")
    assert (w.granularity.name, w.rounding.name, a.rounding.name) == ("PCS", "POW2", "POW2")
    w, _, _ = c.rules_for(f"{MOE}.w13_list.0", "MoeMatmul")
    assert w.value_type.name == "OPT" and w.params["weight_scales"] is None          # params from the preset
    w, a, _ = c.rules_for("lm_head", "ParallelLMHead")
    assert (w.value_type.name, a.backoff) == ("MAXABS", 0.25)
    # a missing field of the default gets INC's built-in default: IDENTITY rounding, backoff 1.0
    c = cfg(scale_method={"default": {"weight": {}, "activation": {}}})
    w, a, _ = c.rules_for("x")
    assert c.method_name == "MAXABS_ARBITRARY" and (w.backoff, a.backoff) == (1.0, 1.0)


@pytest.mark.parametrize("sm, message", [
    ({"nodes": {}}, "needs a 'default'"),
    ({"default": {"weight": {"rounding_method": "POW2"}, "activation": {"rounding_method": "HW_ALIGNED"}}},
     "matches no predefined scale method"),
    ({"default": {"weight": {"granularity": "PXS"}}}, "invalid Granularity"),
    ({"default": {"weight": {"backof": 1}}}, "unknown key"),
    ({"default": {}, "layers": {"x": {}}}, "layer indices"),
    ({"default": {}, "groups": {}}, "unknown key"),
])
def test_scale_method_dict_errors(sm, message):
    with pytest.raises(QuantConfigError, match=message):
        cfg(scale_method=sm)


def test_backoff_follows_inc_version():
    with pytest.warns(UserWarning, match="ignored"):
        c = cfg(scale_method="maxabs_arbitrary", scale_params={"input_backoff": 0.5, "weight_backoff": 1.0})
    w, a, o = c.rules_for("x")
    assert (w.backoff, a.backoff, o.backoff) == (0.5, 0.25, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = cfg(scale_method="maxabs_arbitrary", inc_version="3.4.1",
                scale_params={"input_backoff": 0.5, "weight_backoff": 1.0, "output_backoff": 0.125})
    w, a, o = c.rules_for("x")
    assert (w.backoff, a.backoff, o.backoff) == (1.0, 0.5, 0.125)
    assert activation_scale(10.0, a, G3, E4M3FN) == 0.044677734375     # 10 / 224 rounded to bf16, as INC
    dyn = dict(dynamic_quantization=True, scale_method="maxabs_pcs_pow2")
    assert cfg(**dyn).rules_for("x")[1].backoff == 0.5                       # INC >= 3.8.1
    assert cfg(inc_version="3.8", **dyn).rules_for("x")[1].backoff == 1.0


# ================================ scale formulas ================================================
def test_worked_example_maxabs_hw():
    w, a, _ = rules("maxabs_hw")
    assert activation_scale(10.0, a, G2, E4M3_GAUDI2) == 1.0
    assert activation_scale(10.0, a, G3, E4M3FN) == 0.125
    assert float(weight_scale(w, G2, E4M3_GAUDI2, amax=0.5)) == 1 / 16
    assert float(weight_scale(w, G3, E4M3FN, torch.tensor([[0.5, -0.25]]))) == 2.0 ** -8


def test_maxabs_hw_clamps_and_zero():
    _, a, _ = rules("maxabs_hw")
    assert activation_scale(1e4, a, G2, E4M3_GAUDI2) == 16.0        # 2^6 -> step 4 -> 2^8 -> clamp 2^4
    assert activation_scale(1e6, a, G3, E4M3FN) == 128.0
    assert activation_scale(1e-3, a, G2, E4M3_GAUDI2) == 2.0 ** -8  # 2^-16 clamps up to min
    assert activation_scale(0.0, a, G2, E4M3_GAUDI2) == 2.0 ** -8
    assert activation_scale(0.0, a, G3, E4M3FN) == 2.0 ** -55
    assert activation_scale(3.0, a, G2, E4M3_GAUDI2) == 1 / 16      # 3/60 = 0.05 -> 2^-4
    # CUDA: any float scale is hardware aligned (computed in bf16 too); zero amax gets the neutral 1
    assert activation_scale(10.0, a, CUDA, E4M3FN) == 0.08935546875 != 10 / 112
    assert activation_scale(0.0, a, CUDA, E4M3FN) == 1.0


def test_maxabs_pow2_and_arbitrary():
    w, a, _ = rules("maxabs_pow2")
    assert activation_scale(10.0, a, G3, E4M3FN) == 0.125           # 0.0893 -> 2^-3
    assert activation_scale(10.0, a, G2, E4M3_GAUDI2) == 0.25       # 0.1667 -> 2^-2 (no HW step)
    assert activation_scale(0.0, a, G3, E4M3FN) == 0.0              # INC: pow2 of 0 is 0
    assert float(weight_scale(w, G3, E4M3FN, amax=0.5)) == 2.0 ** -8
    assert float(weight_scale(w, G3, E4M3FN, amax=0.4375)) == 2.0 ** -9  # 0.4375/224 = 2^-9 exactly stays
    w, a, _ = rules("maxabs_arbitrary")
    assert activation_scale(10.0, a, G3, E4M3FN) == 0.08935546875     # bf16, not 10 / 112
    assert float(weight_scale(w, G2, E4M3_GAUDI2, amax=0.5)) == 0.004180908203125


def test_unit_and_single_scale():
    w, a, _ = rules("unit_scale")
    assert activation_scale(123.0, a, G3, E4M3FN) == 1.0 and float(weight_scale(w, G3, E4M3FN)) == 1.0
    w, a, _ = rules("hw_aligned_single_scale")
    assert activation_scale(5.0, a, G2, E4M3_GAUDI2) == 16.0 and float(weight_scale(w, G3, E4M3FN)) == 128.0


def test_pcs_maxabs_pow2_weight():
    w, _, _ = rules("act_maxabs_hw_weights_pcs_maxabs_pow2")
    W = torch.tensor([[1.0, -0.5], [0.1, 0.0], [0.0, 0.0]])
    s = weight_scale(w, G3, E4M3FN, W)
    # 1/224 -> 2^-7; 0.1/224 -> 2^-11; all-zero row -> tiny_bf16 -> 2^-126
    assert s.tolist() == [2.0 ** -7, 2.0 ** -11, 2.0 ** -126]
    with pytest.raises(ValueError, match="need the weight tensor"):
        weight_scale(w, G3, E4M3FN, amax=1.0)


def test_opt_pts_weight_hw_set_ties_go_to_the_later_candidate():
    w, _, _ = rules("maxabs_hw_opt_weight")
    # candidates [16, 1, 1/16, 1/256]: 16, 1 and 1/16 all reproduce W exactly; the last of them wins
    assert float(weight_scale(w, G2, E4M3_GAUDI2, torch.tensor([[1.0, 2.0, -3.0]]))) == 1 / 16
    # 200 -> 192 at s=1 and 12.5 -> 12 at s=16: equal error 8, the later candidate (1) wins
    assert float(weight_scale(w, G2, E4M3_GAUDI2, torch.tensor([[200.0]]))) == 1.0


def test_opt_pts_weight_pow2_ladder():
    w, _, _ = rules("maxabs_pow2_opt_weight")
    # 1, 2, 3 are exact fp8 subnormals at the largest candidate 2^9 (1/512 = 2^-9 ...)
    assert float(weight_scale(w, G3, E4M3FN, torch.tensor([[1.0, 2.0, -3.0]]))) == 512.0


def test_opt_pcs_weight_first_minimum():
    w, _, _ = rules("act_maxabs_pow2_weights_pcs_opt_pow2")
    W = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    s = weight_scale(w, G3, E4M3FN, W)
    # row 0: s_ref = 2^-7; mu = 1/8, 1/4 saturate (1024, 512 > 448), mu = 1/2 is exact -> 2^-8
    # row 1: every mu is exact, the first (1/8) wins -> 2^-126 / 8
    assert s.tolist() == [2.0 ** -8, 2.0 ** -129]
    w, _, _ = rules("act_maxabs_hw_weights_pcs_opt_pow2")
    assert weight_scale(w, G3, E4M3FN, W).tolist() == [2.0 ** -8, 2.0 ** -129]


def test_dynamic_method_weight_scale():
    c = cfg(dynamic_quantization=True, scale_method="act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw")
    w, a, _ = c.rules_for("x")
    assert float(weight_scale(w, G2, E4M3_GAUDI2, amax=0.5)) == 1 / 16
    with pytest.raises(ValueError, match="run time"):
        activation_scale(1.0, a, G3, E4M3FN)
    ns = node_scales("lin", "linear", NodeStats([3.0], None, 0.5), c.rules_for("x"), G3, E4M3FN)
    assert ns.inputs == [] and float(ns.weight) == 2.0 ** -8


def test_node_scales_per_op():
    r = rules("maxabs_hw")
    lin = node_scales("q", "linear", NodeStats([10.0], None, 0.5), r, G3, E4M3FN)
    assert (lin.inputs, float(lin.weight)) == ([0.125], 2.0 ** -8)
    assert float(lin.outputs[0]) == 0.125 * 2.0 ** -8                              # s_x * s_w
    assert node_scales("k", "kv_cache", NodeStats([10.0]), r, G3, E4M3FN).outputs == [0.125]
    mm = node_scales("m", "matmul", NodeStats([10.0, 40.0]), r, G3, E4M3FN)
    assert (mm.inputs, mm.outputs) == ([0.125, 0.5], [0.0625])
    sm = node_scales("s", "softmax", NodeStats([31.0], [1.0]), r, G3, E4M3FN)
    assert (sm.inputs, sm.outputs) == ([], [2.0 ** -6])                            # 1/112 -> 2^-6
    sd = node_scales("f", "fused_sdpa", NodeStats([10.0, 10.0, 40.0], [10.0, 40.0]), r, G3, E4M3FN)
    assert (sd.inputs, sd.outputs) == ([0.125, 0.125, 0.5, 0.5], [0.125])
    with pytest.raises(ValueError, match="no outputs"):
        node_scales("s", "softmax", NodeStats([31.0]), r, G3, E4M3FN)


def test_pcs_linear_output_is_a_vector():
    r = rules("act_maxabs_pow2_weights_pcs_maxabs_pow2")
    W = torch.tensor([[1.0, -0.5, 0.0], [0.1, 0.0, 0.0]])
    ns = node_scales("q", "linear", NodeStats([10.0], None, 1.0), r, G3, E4M3FN, W)
    assert ns.weight.tolist() == [2.0 ** -7, 2.0 ** -11] and ns.weight_in.tolist() == [1.0, 1.0, 1.0]
    assert torch.as_tensor(ns.outputs[0]).tolist() == [0.125 * 2.0 ** -7, 0.125 * 2.0 ** -11]


def test_moe_scales_and_cold_experts():
    r = rules("maxabs_hw")
    stats = NodeStats([10.0], [40.0, 20.0, 0.0, 5.0])
    ns = node_scales(MOE, "dynamic_moe", stats, r, G3, E4M3FN)
    # [s_hidden, s_int_e0..e2], s_out; cold expert 1 borrows the layer's max amax 20 (not 2^-55)
    assert ns.inputs == [0.125, 0.25, 0.25, 2.0 ** -4] and ns.outputs == [0.5]
    raw = node_scales(MOE, "dynamic_moe", stats, r, G3, E4M3FN, fill_cold=False)
    assert raw.inputs[2] == 2.0 ** -55                                              # INC's behaviour
    assert fill_cold_experts([0.0, 0.0]) == ([None, None], [0, 1])
    all_cold = node_scales(MOE, "dynamic_moe", NodeStats([1.0], [1.0, 0.0, 0.0]), r, G2, E4M3_GAUDI2)
    assert all_cold.inputs[1:] == [16.0, 16.0]                                      # widest HW scale


def test_compute_scales_and_scale_file_round_trip(tmp_path):
    meas = Measurements({
        f"{L0}.self_attn.qkv_proj": NodeStats([10.0], None, 0.5),
        f"{L0}.self_attn.o_proj": NodeStats([3.0], [5.0, 5.0], 0.25),
        f"{L0}.self_attn.attn.impl.k_cache": NodeStats([10.0]),
        MOE: NodeStats([10.0], [40.0, 20.0, 0.0]),
        f"{MOE}.w13_list.0": NodeStats([0.0], None, 0.5),
        "lm_head": NodeStats([10.0], None, 0.5),
    }, local_rank=3)
    c = cfg(scale_method="maxabs_hw", dump_stats_path=str(tmp_path / "inc_output"),
            blocklist={"names": ["lm_head"]})
    sf = compute_scales(meas, c, device=G3)
    # moe: s_hidden 10 -> 2^-3; experts 20 -> 2^-2, cold expert borrows 20; output 40 -> 2^-1
    assert "lm_head" not in sf.nodes and (sf.nodes[MOE].inputs, sf.nodes[MOE].outputs) == ([0.125, 0.25, 0.25], [0.5])
    assert sf.nodes[f"{MOE}.w13_list.0"].inputs == [2.0 ** -55]                   # unused dummy input
    stem = scale_file_stem(c, 3, 8)
    assert stem.endswith("inc_output_hooks_maxabs_MAXABS_HW_3_8")
    sf.save(stem)
    js = json.loads(open(stem + ".json").read())
    assert js["Mode"] == "Scale" and js["LocalRank"] == 3
    assert js["Nodes"][f"{L0}.self_attn.qkv_proj"] == {"inputs": [0.125], "outputs": [0.125 * 2.0 ** -8],
                                                       "params": {"weight": 2.0 ** -8}}
    assert js["Nodes"][f"{L0}.self_attn.attn.impl.k_cache"] == {"inputs": [0.125], "outputs": [0.125],
                                                                "params": {}}
    npz = np.load(stem + ".npz", allow_pickle=True)["arr_0"].item()
    assert npz["Nodes"][MOE]["inputs"][1].item() == 0.25
    back = ScaleFile.load(stem + ".npz")
    assert back.nodes[MOE].inputs == sf.nodes[MOE].inputs
    assert float(back.nodes[f"{L0}.self_attn.o_proj"].weight) == float(sf.nodes[f"{L0}.self_attn.o_proj"].weight)


def test_pcs_scale_file_layout(tmp_path):
    name = f"{L0}.self_attn.qkv_proj"
    meas = Measurements({name: NodeStats([10.0], None, 1.0)})
    c = cfg(scale_method="act_maxabs_pow2_weights_pcs_maxabs_pow2", dump_stats_path=str(tmp_path / "p"))
    with pytest.raises(ValueError, match="weight tensor"):
        compute_scales(meas, c, device=G3)
    sf = compute_scales(meas, c, device=G3, weights={name: torch.tensor([[1.0, 0.0], [0.1, 0.0]])})
    stem = scale_file_stem(c)
    sf.save(stem)
    assert stem.endswith("p_hooks_maxabs_ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2")
    js = json.loads(open(stem + ".json").read())
    assert js["Nodes"][name]["params"]["weight"] == {"0": [2.0 ** -7, 2.0 ** -11], "1": [1.0, 1.0]}
    npz = np.load(stem + ".npz", allow_pickle=True)["arr_0"].item()
    assert set(npz["Nodes"][name]["params"]["weight"]) == {0, 1}
    assert ScaleFile.load(stem + ".json").nodes[name].weight.tolist() == [2.0 ** -7, 2.0 ** -11]


def test_scales_for_rank_caches_like_inc(tmp_path):
    prefix = str(tmp_path / "inc_output")
    name = f"{L0}.self_attn.qkv_proj"
    c = cfg(dump_stats_path=prefix)
    with pytest.raises(FileNotFoundError, match="MEASURE"):
        scales_for_rank(c, 0, 2, device=G3)
    Measurements({name: NodeStats([10.0], None, 0.5)}, local_rank=0).save(measurement_stem(prefix, "maxabs", 0, 2))
    first = scales_for_rank(c, 0, 2, device=G3)
    assert first.nodes[name].inputs == [0.125]
    assert (tmp_path / "inc_output_hooks_maxabs_MAXABS_HW_0_2.npz").exists()
    # new measurements: the cache wins unless recalc_scales is set
    Measurements({name: NodeStats([40.0], None, 0.5)}, local_rank=0).save(measurement_stem(prefix, "maxabs", 0, 2))
    assert scales_for_rank(c, 0, 2, device=G3).nodes[name].inputs == [0.125]
    assert scales_for_rank(cfg(dump_stats_path=prefix, recalc_scales=True), 0, 2, device=G3).nodes[name].inputs == [0.5]
    assert scales_for_rank(c, 0, 2, device=G3).nodes[name].inputs == [0.5]   # recalc rewrote the cache
    # a dict-form method (the same preset, another activation backoff) is recomputed and not cached:
    # its scales must not become what the plain preset reads next
    backoff_1 = cfg(dump_stats_path=prefix, scale_method={
        "default": {"weight": {"rounding_method": "HW_ALIGNED", "backoff": 0.5},
                    "activation": {"rounding_method": "HW_ALIGNED", "backoff": 1.0}}})
    assert backoff_1.method_name == c.method_name
    assert scales_for_rank(backoff_1, 0, 2, device=G3).nodes[name].inputs == [0.125]   # 40 / 448, up to 2^-3
    assert scales_for_rank(c, 0, 2, device=G3).nodes[name].inputs == [0.5]
    # a node blocklisted since the cache was written stays out of the scales (bf16), as INC's
    # should_quantize leaves it out whatever the cache holds
    other = name.replace("layers.0.", "layers.1.")
    Measurements({name: NodeStats([10.0], None, 0.5), other: NodeStats([4.0], None, 0.5)},
                 local_rank=0).save(measurement_stem(prefix, "maxabs", 0, 2))
    both = scales_for_rank(cfg(dump_stats_path=prefix, recalc_scales=True), 0, 2, device=G3)
    assert set(both.nodes) == {name, other}
    blocked = cfg(dump_stats_path=prefix, blocklist={"types": [], "names": [r"layers\.1\.self_attn"]})
    assert set(scales_for_rank(blocked, 0, 2, device=G3).nodes) == {name}
    assert set(scales_for_rank(c, 0, 2, device=G3).nodes) == {name, other}   # the cache itself is unchanged


# ================================ names and the collector =======================================
def test_herd_to_inc_names():
    nodes = inc_nodes_for_module(f"{L0}.feed_forward.experts", "FusedMoE", 2, prefix="language_model.")
    assert [n.name for n in nodes] == [
        f"language_model.{MOE}", f"language_model.{MOE}.w13_list.0", f"language_model.{MOE}.w13_list.1",
        f"language_model.{MOE}.w2_list.0", f"language_model.{MOE}.w2_list.1"]
    assert nodes[0].num_outputs == 3 and nodes[1].class_name == "MoeMatmul"
    attn = inc_nodes_for_module(f"{L0}.self_attn.attn", "Attention")
    impl = f"{L0}.self_attn.attn.impl"
    assert [(n.name, n.class_name, n.type) for n in attn] == [
        (f"{impl}.k_cache", "VLLMKVCache", "kv_cache"), (f"{impl}.v_cache", "VLLMKVCache", "kv_cache"),
        (f"{impl}.matmul_qk", "Matmul", "matmul"), (f"{impl}.softmax", "Softmax", "softmax"),
        (f"{impl}.matmul_av", "Matmul", "matmul")]
    assert inc_nodes_for_module(f"{L0}.self_attn.o_proj", "RowParallelLinear")[0].type == "row_parallel_linear"
    assert inc_nodes_for_module(f"{L0}.input_layernorm", "RMSNorm") == []
    assert herd_target(f"language_model.{MOE}.w2_list.7") == (f"{L0}.feed_forward.experts", "w2", 7)
    assert herd_target(f"{L0}.self_attn.attn.impl.v_cache") == (f"{L0}.self_attn.attn", "v_cache", None)
    assert herd_target("language_model.lm_head") == ("lm_head", "linear", None)
    # dense Llama 1-3: vLLM's `mlp` is herd's `feed_forward`
    dense = NodeNaming(mlp="mlp")
    assert inc_nodes_for_module(f"{L0}.feed_forward.down_proj", "RowParallelLinear", prefix=dense)[0].name == \
        f"{L0}.mlp.down_proj"
    assert inc_nodes_for_module(f"{L0}.self_attn.qkv_proj", "QKVParallelLinear", prefix=dense)[0].name == \
        f"{L0}.self_attn.qkv_proj"
    assert herd_target(f"{L0}.mlp.gate_up_proj") == (f"{L0}.feed_forward.gate_up_proj", "linear", None)
    assert NodeNaming.for_model(SimpleNamespace(architecture="LlamaForCausalLM", multimodal=False)) == dense
    assert NodeNaming.for_model(SimpleNamespace(architecture="Llama4ForConditionalGeneration",
                                                multimodal=True)) == NodeNaming("language_model.")


def test_file_names():
    assert measurement_stem("/o/g3/inc_output", "maxabs", 3, 8) == "/o/g3/inc_output_hooks_maxabs_3_8"
    assert measurement_stem("/o/g3/inc_output") == "/o/g3/inc_output_hooks_maxabs"
    make = lambda r, w: measurement_stem("/o/p", "maxabs", r, w)  # noqa: E731
    # one rank: write what vLLM-HPU reads (_0_1), read the unsuffixed spelling too
    assert rank_stems(make, None, None) == rank_stems(make, 0, 1) == ["/o/p_hooks_maxabs_0_1", "/o/p_hooks_maxabs"]
    assert rank_stems(make, 1, 2) == ["/o/p_hooks_maxabs_1_2"]
    assert rank_stems(make, 1, 2, separate=False) == ["/o/p_hooks_maxabs"]


def test_single_rank_files_of_both_spellings(tmp_path):
    """A TP=1 file from vLLM-HPU (_0_1) and one from INC without torch.distributed (no suffix) both
    serve a single rank; herd writes _0_1 and its scale cache next to it."""
    name = f"{L0}.self_attn.qkv_proj"
    for spelling, written in (("_0_1", "inc_output_hooks_maxabs_MAXABS_HW_0_1.npz"),
                              ("", "inc_output_hooks_maxabs_MAXABS_HW_0_1.npz")):
        d = tmp_path / (spelling or "plain")
        c = cfg(dump_stats_path=str(d / "inc_output"), device_for_scales="GAUDI3")
        Measurements({name: NodeStats([10.0], None, 0.5)}, local_rank=0).save(str(d / "inc_output_hooks_maxabs") + spelling)
        for rank, world in ((None, None), (0, 1)):
            assert scales_for_rank(c, rank, world).nodes[name].inputs == [0.125]
        assert (d / written).exists()
    col = MeasurementCollector(cfg(mode="MEASURE", dump_stats_path=str(tmp_path / "m" / "inc_output")), 0, 1)
    col.add_node(_node("q", "linear", "Linear"))
    assert [p.name for p in col.save()][0] == "inc_output_hooks_maxabs_0_1.json"
    # both spellings present: the suffixed one is the rank's file
    Measurements({"q": NodeStats([1.0])}).save(tmp_path / "m" / "inc_output_hooks_maxabs")
    assert find_measurement_sets(tmp_path / "m" / "inc_output")[1][0].name == "inc_output_hooks_maxabs_0_1.npz"


def test_cuda_scales_get_their_own_cache(tmp_path):
    """INC on Gaudi reuses any cache named after the method; herd's CUDA scales (HW_ALIGNED = any
    float) go to <METHOD>_CUDA so they never land in a Gaudi run. INC's own cache is used by herd
    only when there are no measurements."""
    prefix = str(tmp_path / "inc_output")
    name = f"{L0}.self_attn.qkv_proj"
    Measurements({name: NodeStats([10.0], None, 0.5)}, local_rank=0).save(measurement_stem(prefix, "maxabs", 0, 1))
    c = cfg(dump_stats_path=prefix)
    assert scales_for_rank(c, 0, 1, device=CUDA).nodes[name].inputs == [0.08935546875]
    assert (tmp_path / "inc_output_hooks_maxabs_MAXABS_HW_CUDA_0_1.npz").exists()
    assert not (tmp_path / "inc_output_hooks_maxabs_MAXABS_HW_0_1.npz").exists()
    ScaleFile({name: NodeScales([0.125], [2.0 ** -11], torch.tensor(2.0 ** -8))}).save(
        scale_file_stem(c, 0, 1))                                           # what INC's step 4 writes
    for p in tmp_path.glob("inc_output_hooks_maxabs_0_1*"):
        p.unlink()
    (tmp_path / "inc_output_hooks_maxabs_MAXABS_HW_CUDA_0_1.npz").unlink()
    assert scales_for_rank(c, 0, 1, device=CUDA).nodes[name].inputs == [0.125]


def _node(name, op, cls, **kw):
    return IncNode(name, cls, op, name, "linear", **kw)


def test_collector_running_max_in_bf16_and_layout():
    col = MeasurementCollector(cfg(mode="MEASURE"))
    assert col.add_node(_node("q", "linear", "QKVParallelLinear"))
    assert col.add_node(_node("o", "row_parallel_linear", "RowParallelLinear"))
    assert col.add_node(_node("sm", "softmax", "Softmax"))
    col.observe("q", "inputs", 0, torch.tensor([1.0, -3.3]))
    col.observe("q", "inputs", 0, torch.tensor([2.0]))
    col.observe("q", "outputs", 0, torch.tensor([99.0]))            # linear outputs are excluded
    col.observe("q", "weight", 0, torch.tensor([[0.5, -0.75]]))
    col.observe("o", "outputs", 1, torch.tensor([-7.0]))
    col.observe("sm", "outputs", 0, torch.empty(0))                  # empty tensors are ignored
    m = col.measurements()
    assert m.nodes["q"] == NodeStats([torch.tensor(3.3).bfloat16().item()], None, 0.75)
    assert m.nodes["o"].outputs == [0.0, 7.0] and m.nodes["sm"].outputs == [0.0]
    assert not col.wants("q", "outputs") and col.wants("o", "outputs")
    with pytest.raises(KeyError, match="never registered"):
        col.observe("missing", "inputs", 0, torch.ones(1))
    with pytest.raises(IndexError):
        col.observe("q", "inputs", 1, torch.ones(1))
    with pytest.raises(ValueError, match="kind"):
        col.observe("q", "params", 0, torch.ones(1))
    # measure_exclude NONE records the optional outputs too
    col = MeasurementCollector(cfg(mode="MEASURE", measure_exclude="NONE"))
    col.add_node(_node("q", "linear", "Linear"))
    col.observe("q", "outputs", 0, torch.tensor([99.0]))
    assert col.measurements().nodes["q"].outputs == [99.0]


def test_collector_filters_by_type_and_name():
    c = cfg(mode="MEASURE", blocklist={"types": ["VLLMKVCache"], "names": [r"lm_head$", r"\.router"]})
    col = MeasurementCollector(c)
    assert not col.add_node(_node("x.k_cache", "kv_cache", "VLLMKVCache"))
    assert not col.add_node(_node("lm_head", "linear", "ParallelLMHead"))
    assert not col.add_node(_node("l.feed_forward.router", "linear", "ReplicatedLinear"))
    assert not col.add_node(_node("n", "linear", "RMSNorm"))        # not a patched type
    assert col.add_node(_node("l.o_proj", "row_parallel_linear", "RowParallelLinear"))
    col.observe("lm_head", "inputs", 0, torch.ones(1))              # filtered out: a silent no-op
    assert col.mod_list == ["l.o_proj"]
    allow = MeasurementCollector(cfg(mode="MEASURE", allowlist={"types": ["MoeMatmul"], "names": ["o_proj"]}))
    assert allow.add_node(_node("a.o_proj", "row_parallel_linear", "RowParallelLinear"))
    assert allow.add_node(_node("e.w13_list.0", "linear", "MoeMatmul"))
    assert not allow.add_node(_node("a.qkv_proj", "linear", "QKVParallelLinear"))


def test_collector_moe_and_files(tmp_path):
    prefix = tmp_path / "g3" / "inc_output"
    col = MeasurementCollector(cfg(mode="MEASURE", dump_stats_path=str(prefix)), rank=1, world_size=2)
    nodes = col.add_module(f"{L0}.feed_forward.experts", "FusedMoE", num_local_experts=3)
    assert len(nodes) == 7
    col.observe(MOE, "inputs", 0, torch.tensor([12.5]))
    col.observe(MOE, "outputs", 0, torch.tensor([30.0]))
    col.observe_expert_amax(MOE, torch.tensor([4.25, 0.0, 3.90625]))
    col.observe_expert_amax(MOE, torch.tensor([1.0, 0.0, 5.0]))
    col.observe(f"{MOE}.w13_list.0", "weight", 0, torch.tensor([[0.0546875]]))
    with pytest.raises(ValueError, match="3 local experts"):
        col.observe_expert_amax(MOE, torch.ones(2))
    paths = col.save()
    assert [p.name for p in paths] == ["inc_output_hooks_maxabs_1_2.json", "inc_output_hooks_maxabs_1_2.npz",
                                       "inc_output_hooks_maxabs_1_2_mod_list.json"]
    text = paths[0].read_text()
    js = json.loads(text)
    assert text.startswith('{\n    "GlobalRank": null,')                        # json.dump(indent=4)
    assert js["LocalRank"] == 1 and js["Mode"] == "DynamicRange" and "NumSamples" not in js
    assert js["Nodes"][MOE] == {"inputs": [[[12.5]]], "outputs": [[[30.0]], [[4.25]], [[0.0]], [[5.0]]]}
    assert js["Nodes"][f"{MOE}.w13_list.0"] == {"inputs": [[[0.0]]], "params": {"weight": [[0.0546875]]}}
    npz = np.load(paths[1], allow_pickle=True)["arr_0"].item()
    assert npz["Nodes"][MOE]["outputs"][3].dtype == np.float32 and npz["Nodes"][MOE]["outputs"][3].shape == (1, 1)
    # _mod_list.json lists what INC selects: the patched-only FusedMoE, then its measured nodes
    assert json.loads(paths[2].read_text()) == [f"{L0}.feed_forward.experts"] + [n.name for n in nodes]
    assert Measurements.load(paths[1]) == Measurements.load(paths[0]) == col.measurements()
    assert Measurements.load(str(paths[0])[:-5]).nodes[MOE].outputs[1] == 4.25     # bare stem -> npz


def test_load_accepts_stacked_arrays_and_rejects_scale_files(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, {"GlobalRank": None, "LocalRank": 0, "Mode": "DynamicRange",
                 "Nodes": {"a": {"inputs": np.array([[[1.5]], [[2.5]]]), "params": {"weight": np.array([[0.5]])}}}})
    assert Measurements.load(p).nodes["a"] == NodeStats([1.5, 2.5], None, 0.5)
    np.savez(p, {"Mode": "Scale", "Nodes": {}})
    with pytest.raises(ValueError, match="scale-cache"):
        Measurements.load(p)
    with pytest.raises(FileNotFoundError, match="MEASURE pass"):
        Measurements.load(tmp_path / "missing.npz")


def test_sample_interval_and_unsuffixed_files(tmp_path):
    prefix = tmp_path / "inc_output"
    col = MeasurementCollector(cfg(mode="MEASURE", dump_stats_path=str(prefix), calibration_sample_interval=2))
    col.add_node(_node("q", "linear", "Linear"))
    col.step()
    assert not (tmp_path / "inc_output_hooks_maxabs_0_1.json").exists()
    col.step()
    js = json.loads((tmp_path / "inc_output_hooks_maxabs_0_1.json").read_text())
    assert list(js)[0] == "NumSamples" and js["NumSamples"] == 2 and js["LocalRank"] == 0
    one = MeasurementCollector(cfg(mode="MEASURE", dump_stats_path=str(prefix), seperate_measure_files=False))
    one.add_node(_node("q", "linear", "Linear"))
    assert one.save()[0].name == "inc_output_hooks_maxabs.json" and one.measurements().local_rank is None


def test_backup_existing_moves_prefixed_files(tmp_path):
    (tmp_path / "inc_output_hooks_maxabs_0_2.json").write_text("{}")
    (tmp_path / "inc_output_hooks_maxabs_0_2.npz").write_text("")
    (tmp_path / "other.json").write_text("{}")
    col = MeasurementCollector(cfg(mode="MEASURE", dump_stats_path=str(tmp_path / "inc_output")),
                               rank=1, world_size=2)
    assert col.prepare_output_dir() is None                                       # only rank 0 moves files
    dest = backup_existing(tmp_path / "inc_output", now=0.0)
    assert dest.name.startswith("backup_inc_output_") and dest.name.count(":") == 2
    assert sorted(p.name for p in dest.iterdir()) == ["inc_output_hooks_maxabs_0_2.json",
                                                      "inc_output_hooks_maxabs_0_2.npz"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["other.json"]
    assert backup_existing(tmp_path / "inc_output") is None


def test_collector_on_a_herd_model(scout_dir):
    from herd.model.loader import load_model
    model = load_model(scout_dir, dtype=torch.float32)
    col = MeasurementCollector(cfg(mode="MEASURE", blocklist={"names": ["lm_head"]}))
    names = [n.name for n in col.add_model(model, prefix="language_model.")]
    p = "language_model.model.layers.0"
    for expected in (f"{p}.self_attn.qkv_proj", f"{p}.self_attn.o_proj", f"{p}.self_attn.attn.impl.k_cache",
                     f"{p}.feed_forward.router", f"{p}.feed_forward.experts.moe_op",
                     f"{p}.feed_forward.experts.moe_op.w2_list.3",
                     f"{p}.feed_forward.shared_expert.gate_up_proj"):
        assert expected in names
    assert "language_model.lm_head" not in names
    m = col.measurements()
    w13 = model.get_submodule("model.layers.0.feed_forward.experts").w13_weight[2]
    assert m.nodes[f"{p}.feed_forward.experts.moe_op.w13_list.2"].weight == \
        w13.abs().max().bfloat16().item()
    assert m.nodes[f"{p}.feed_forward.experts.moe_op"].outputs == [0.0] * 5


# ================================ unify, coverage, postprocess ==================================
def _rank(r: int, experts: int = 2) -> Measurements:
    """Rank r of a TP run: values grow with the rank so the max of a group is its last member."""
    return Measurements({
        f"{L0}.self_attn.o_proj": NodeStats([1.0 + r], [10.0 + r, 10.0 + r], 0.125 * (r + 1)),
        MOE: NodeStats([5.0 + r], [20.0 + r] + [float(r * 10 + e) for e in range(experts)]),
        f"{MOE}.w13_list.0": NodeStats([0.0], None, 2.0 ** -6 * (r + 1)),
    }, local_rank=r)


def test_overlapping_ranks():
    assert overlapping_ranks(1, 2, 4) == [2, 3]        # merge, as INC's step 5
    assert overlapping_ranks(3, 4, 4) == [3]           # same size
    assert overlapping_ranks(5, 8, 4) == [2]           # split: parent rank
    assert overlapping_ranks(1, 3, 4) == [1, 2]        # uneven: every overlapping source


def test_unify_tp_smaller_equal_larger():
    src = [_rank(r) for r in range(4)]
    two = unify(src, 2)
    assert [m.local_rank for m in two] == [0, 1]
    assert two[0].nodes == _rank(1).nodes and two[1].nodes == _rank(3).nodes
    lo = unify([_rank(1), _rank(0)], 1)[0]             # element-wise max, not "the last rank"
    assert lo.nodes[MOE].outputs == [21.0, 10.0, 11.0] and lo.local_rank == -1
    same = unify(src, 4)
    assert [m.nodes for m in same] == [m.nodes for m in src]
    eight = unify(src, 8)
    assert len(eight) == 8 and all(eight[i].nodes == src[i // 2].nodes for i in range(8))
    three = unify(src, 3)
    assert three[1].nodes == _rank(2).nodes            # covers parts of ranks 1 and 2


def test_unify_expert_parallel_and_expand():
    src = [_rank(r) for r in range(2)]                # 2 ranks x 2 local experts = 4 experts
    one = unify(src, 1, expert_parallel=True)[0]
    assert one.nodes[MOE].outputs == [21.0, 0.0, 1.0, 10.0, 11.0]          # concatenated in rank order
    assert one.nodes[MOE].inputs == [6.0]
    assert one.nodes[f"{MOE}.w13_list.2"].weight == 2.0 ** -5                    # rank 1's local expert 0
    assert f"{MOE}.w13_list.1" not in one.nodes
    four = expand_experts(one, 4)
    assert [m.nodes[MOE].outputs for m in four] == [[21.0, 0.0], [21.0, 1.0], [21.0, 10.0], [21.0, 11.0]]
    assert [f"{MOE}.w13_list.0" in m.nodes for m in four] == [True, False, True, False]
    assert four[2].nodes[f"{MOE}.w13_list.0"].weight == 2.0 ** -5
    with pytest.raises(ValueError, match="cannot be split evenly"):
        unify(src, 3, expert_parallel=True)
    uneven = [_rank(0, experts=2), _rank(1, experts=3)]
    with pytest.raises(ValueError, match="expert_parallel=True"):
        unify(uneven, 1)


def test_unify_files(tmp_path):
    prefix = tmp_path / "inc_output"
    for r in range(4):
        _rank(r).save(measurement_stem(prefix, "maxabs", r, 4))
    (tmp_path / "inc_output_hooks_maxabs_MAXABS_HW_0_8.npz").write_text("")  # a scale cache must not count
    with pytest.warns(UserWarning, match="scale caches for world size 8"):
        written = unify_files(prefix, 8)
    assert len(written) == 24
    got = np.load(tmp_path / "inc_output_hooks_maxabs_5_8.npz", allow_pickle=True)["arr_0"].item()
    assert got["LocalRank"] == 5 and got["Nodes"][MOE]["outputs"][1].item() == 20.0
    assert json.loads((tmp_path / "inc_output_hooks_maxabs_5_8_mod_list.json").read_text())[0].endswith("o_proj")
    with pytest.raises(ValueError, match="several world sizes"):
        unify_files(prefix, 2)
    unify_files(prefix, 2, source_world=4)
    assert Measurements.load(tmp_path / "inc_output_hooks_maxabs_1_2.json").nodes == _rank(3).nodes
    (tmp_path / "inc_output_hooks_maxabs_3_4.npz").unlink()
    (tmp_path / "inc_output_hooks_maxabs_3_4.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lack ranks \[3\]"):
        unify_files(prefix, 1, source_world=4)


def test_coverage_report(tmp_path):
    a = Measurements({MOE: NodeStats([1.0], [9.0, 3.0, 0.0, 0.0]),
                      "model.layers.1.feed_forward.experts.moe_op": NodeStats([1.0], [9.0, 1.0, 1.0, 1.0])})
    b = Measurements({MOE: NodeStats([1.0], [9.0, 0.0, 0.0, 2.0]),
                      "model.layers.1.feed_forward.experts.moe_op": NodeStats([1.0], [9.0, 1.0, 1.0, 1.0])})
    tp = coverage_report([a, b])
    assert tp["cold_experts"] == 1 and tp["layers"][0]["cold_experts"] == [1]   # zero on every TP rank
    assert tp["layers"][0]["layer"] == 0 and tp["layers"][1]["cold_experts"] == []
    ep = coverage_report([a, b], expert_parallel=True)
    assert ep["layers"][0]["num_experts"] == 6 and ep["layers"][0]["cold_experts"] == [1, 2, 3, 4]
    assert not ep["all_experts_covered"]
    text = format_coverage(tp)
    assert "layer 0: 1/3 experts got no tokens: [1]" in text and "layer 1" not in text


def test_postprocess_kv_and_sdpa():
    impl = f"language_model.{L0}.self_attn.attn.impl"
    m = Measurements({
        f"{impl}.matmul_qk": NodeStats([6.0, 7.0]), f"{impl}.k_cache": NodeStats([9.0]),
        f"{impl}.matmul_av": NodeStats([1.0, 2.0]), f"{impl}.v_cache": NodeStats([3.0]),
        f"{impl}.fused_scaled_dot_product_attention": NodeStats([1.0, 1.0, 1.0], [4.0, 1.0]),
        f"language_model.{L0}.self_attn.o_proj": NodeStats([2.5], [1.0, 1.0], 0.1),
    })
    changes = postprocess(m)
    assert len(changes) == 3
    assert m.nodes[f"{impl}.matmul_qk"].inputs == [6.0, 9.0]
    assert m.nodes[f"{impl}.matmul_av"].inputs == [1.0, 3.0]
    assert m.nodes[f"{impl}.fused_scaled_dot_product_attention"].outputs == [2.5, 1.0]
    assert postprocess(Measurements({"foo.k_cache": NodeStats([1.0])})) == []  # no layer index


# ================================ calibrate CLI =================================================
ROWS = [{"system_prompt": f"sys {i}", "question": f"q {i}"} for i in range(10)]


def test_cli_flags_and_help(capsys):
    from herd.cli import build_parser
    argv = ["calibrate", "-m", "/models/Llama-4-Scout", "-d", "x.pkl", "-o", "out"]
    args = build_parser(argv).parse_args(argv)
    assert (args.batch_size, args.limit, args.tensor_parallel_size, args.device) == (32, None, 1, "cuda")
    with pytest.raises(SystemExit):
        build_parser(["calibrate", "-h"]).parse_args(["calibrate", "-h"])
    text = capsys.readouterr().out
    for flag in ("-m", "-d", "-o", "-b", "-l", "-t", "-r", "-u", "seed 42", "system_prompt"):
        assert flag in text


def test_dataset_jsonl_and_pickles(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n\n")
    assert cli.load_dataset(p) == ROWS[:3]
    for obj in (ROWS[:3], {"system_prompt": [r["system_prompt"] for r in ROWS[:3]],
                           "question": [r["question"] for r in ROWS[:3]]}):
        pk = tmp_path / "d.pkl"
        pk.write_bytes(pickle.dumps(obj))
        with pytest.warns(UserWarning, match="arbitrary code"):
            assert cli.load_dataset(pk) == ROWS[:3]
    frame = SimpleNamespace(columns=["system_prompt", "question"], to_dict=lambda orient: ROWS[:2])
    assert cli._rows_from_object(frame, p) == ROWS[:2]


def test_dataset_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not download"):
        cli.load_dataset(tmp_path / "NeelNanda/pile-10k")
    pk = tmp_path / "frame.pkl"
    pk.write_bytes(b"cpandas_missing_for_herd_test.core.frame\nDataFrame\n.")
    with pytest.warns(UserWarning), pytest.raises(ModuleNotFoundError):
        cli.load_dataset(pk)
    monkeypatch.setitem(sys.modules, "pandas", None)
    pk.write_bytes(b"cpandas.core.frame\nDataFrame\n.")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="pandas is not installed"):
        cli.load_dataset(pk)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    pq = tmp_path / "d.parquet"
    pq.write_bytes(b"PAR1")
    with pytest.raises(RuntimeError, match="needs pyarrow"):
        cli.load_dataset(pq)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"system_prompt": "s", "prompt": "q"}))
    with pytest.raises(ValueError, match="row 0 needs a string 'question'"):
        cli.load_dataset(bad)
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        cli.load_dataset(bad)
    csv = tmp_path / "d.csv"
    csv.write_text("system_prompt,question\n")
    with pytest.raises(ValueError, match="unsupported dataset format"):
        cli.load_dataset(csv)


def test_select_samples_matches_pandas_sampling():
    assert [r["question"] for r in cli.select_samples(ROWS, 3)] == ["q 8", "q 1", "q 5"]
    assert cli.select_samples(ROWS, None) == ROWS
    with pytest.raises(ValueError, match="positive"):
        cli.select_samples(ROWS, 0)


class _Tok:
    def __init__(self, fail=False):
        self.fail, self.seen = fail, []

    def apply_chat_template(self, conv, tokenize=True):
        assert tokenize is False
        if self.fail:
            raise ValueError("no chat template")
        self.seen.append(conv)
        return "|".join(f"{m['role']}:{m['content']}" for m in conv)


def test_prompt_formatting():
    tok = _Tok()
    assert cli.format_prompt(ROWS[0], tok) == "system:sys 0|user:q 0"
    assert cli.format_prompt(ROWS[0], tok, "mixtral-8x7b") == "user:q 0|assistant:sys 0"
    assert cli.format_prompt(ROWS[0], _Tok(fail=True)) == "sys 0. q 0"
    assert cli.format_prompts(ROWS[:2], None) == ["sys 0. q 0", "sys 1. q 1"]


def test_write_quant_configs(tmp_path):
    root = tmp_path / "llama-4-scout"
    meas, quant, prefix = cli.write_quant_configs(root, "g3")
    assert (meas.name, quant.name) == ("maxabs_measure_g3.json", "maxabs_quant_g3.json")
    assert prefix == (root / "g3" / "inc_output").resolve()
    m, q = json.loads(meas.read_text()), json.loads(quant.read_text())
    # calibrate_model.sh's configs, plus the blocklist of the attention ops herd does not measure
    block = {"types": [], "names": ["batch2block_matmul", "block2batch_matmul", "fused_scaled_dot_product_attention"]}
    assert m == {"method": "HOOKS", "mode": "MEASURE", "observer": "maxabs",
                 "allowlist": {"types": [], "names": []}, "blocklist": block,
                 "quantize_weight": False, "dump_stats_path": str(prefix)}
    assert q["mode"] == "QUANTIZE" and q["scale_method"] == "maxabs_hw" and q["blocklist"] == block
    _, quant, _ = cli.write_quant_configs(root, "cuda", "maxabs_pow2")
    c = IncQuantConfig.from_json_file(quant)
    assert quant.name == "maxabs_quant_cuda.json" and c.method_name == "MAXABS_POW2"
    assert c.scale_device("cuda") is CUDA and c.device_for_scales is None


def test_written_configs_use_only_values_inc_accepts(tmp_path):
    """INC's Fp8cfg.parse rejects device_for_scales CUDA (only GAUDI2 / GAUDI3): every enum value of
    every config herd writes must be in the sets recorded from INC (tests/data/inc_reference.json)."""
    ref = json.loads((Path(__file__).parent / "data" / "inc_reference.json").read_text())["fp8cfg_parse"]
    assert ref["device_for_scales CUDA"].startswith("rejected")
    assert all(v == "accepted" for v in ref["herd_configs_with_use_qdq"].values())
    allowed = ref["enum_values"]
    for dev in ("cuda", "g2", "g3"):
        for method in ("maxabs_hw", "act_maxabs_pow2_weights_pcs_opt_pow2"):
            for path in cli.write_quant_configs(tmp_path / dev, dev, method)[:2]:
                for key, value in json.loads(path.read_text()).items():
                    if key in allowed:
                        assert str(value).upper() in allowed[key], (path.name, key, value)


def _args(tmp_path, data, **kw):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = {a.dest: a.default for a in parser._actions if a.dest != "help"}  # every flag's default
    base.update(model=str(tmp_path / "Llama-4-Scout-Tiny"), dataset=str(data), output_dir=str(tmp_path / "out"),
                batch_size=4, limit=6, tensor_parallel_size=2, target_ranks=None, expert_parallel=False,
                device="cuda", scale_method="maxabs_hw", max_model_len=2048, dtype="auto",
                bf16_layers="none")  # the fake measure has no model to score layers on
    base.update(kw)
    return SimpleNamespace(**base)


def test_run_reports_a_measure_step_that_wrote_nothing(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    monkeypatch.setattr(cli, "load_tokenizer", lambda path: _Tok())
    monkeypatch.setattr(cli, "measure", lambda *a, **k: None)
    assert cli.run(_args(tmp_path, data)) == 1
    assert "wrote no files" in capsys.readouterr().err
    root = tmp_path / "out" / "llama-4-scout-tiny"
    assert (root / "maxabs_quant_cuda.json").exists()
    prompts = [json.loads(line)["input"] for line in (root / "calibration_prompts.jsonl").read_text().splitlines()]
    assert prompts[:2] == ["system:sys 8|user:q 8", "system:sys 1|user:q 1"] and len(prompts) == 6
    assert cli.run(_args(tmp_path, data, batch_size=0)) == 2
    assert cli.run(_args(tmp_path, tmp_path / "missing.jsonl")) == 2


def test_run_end_to_end_with_a_fake_measure(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    monkeypatch.setattr(cli, "load_tokenizer", lambda path: _Tok())
    calls = {}
    impl = f"{L0}.self_attn.attn.impl"

    def fake_measure(model_path, prompts, measure_config, batch_size, tp, *rest):
        quant_config = IncQuantConfig.from_json_file(measure_config)
        calls.update(prompts=len(prompts), batch=batch_size, tp=tp, mode=quant_config.mode)
        for rank in range(tp):
            col = MeasurementCollector(quant_config, rank=rank, world_size=tp)
            col.add_module(f"{L0}.feed_forward.experts", "FusedMoE", num_local_experts=3)
            col.add_node(IncNode(f"{impl}.matmul_qk", "Matmul", "matmul", "", "linear"))
            col.add_node(IncNode(f"{impl}.k_cache", "VLLMKVCache", "kv_cache", "", "k_cache"))
            col.observe(f"{impl}.k_cache", "inputs", 0, torch.tensor([2.0 + rank]))
            col.observe(f"{impl}.matmul_qk", "inputs", 1, torch.tensor([50.0]))
            col.observe_expert_amax(MOE, torch.tensor([1.0 + rank, 0.0, 4.0]))
            col.save()

    monkeypatch.setattr(cli, "measure", fake_measure)
    assert cli.run(_args(tmp_path, data, target_ranks=4)) == 0
    assert calls == {"prompts": 6, "batch": 4, "tp": 2, "mode": "MEASURE"}
    out = capsys.readouterr().out
    assert "layer 0: 1/3 experts got no tokens: [1]" in out and "QUANT_CONFIG=" in out
    g = tmp_path / "out" / "llama-4-scout-tiny" / "cuda"
    report = json.loads((g / "inc_output_coverage.json").read_text())
    assert report["layers"][0]["cold_experts"] == [1]
    fixed = Measurements.load(g / "inc_output_hooks_maxabs_1_2.npz")
    assert fixed.nodes[f"{impl}.matmul_qk"].inputs == [0.0, 3.0]             # step 3: k_cache's amax
    unified = Measurements.load(g / "inc_output_hooks_maxabs_3_4.npz")
    assert unified.nodes[MOE].outputs == [0.0, 2.0, 0.0, 4.0]                # rank 1's values
    assert PRESETS[ScaleMethod.MAXABS_HW].activation.backoff == 0.25


# ================================ attention statistics (vLLM-HPU's attention ops) ===============
def _attention_layer(chunk=None):
    from herd.model.llama4 import Attention
    return Attention(0, num_heads=4, num_kv_heads=2, head_dim=8, chunk=chunk)


def test_attention_stats_match_explicit_attention():
    from herd.quant.methods.inc_attention import attention_stats

    torch.manual_seed(0)
    layer = _attention_layer(chunk=4)
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8) * 3, torch.randn(6, 2, 8) * 2
    pos = torch.arange(6)
    st = attention_stats(layer, q, k, v, pos, None)
    qs = q * layer.scale
    logits = torch.einsum("thd,shd->hts", qs, k.repeat_interleave(2, dim=1))
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] // 4 == pos[:, None] // 4)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    assert float(st["q"]) == pytest.approx(float(qs.abs().max()))
    assert float(st["k"]) == float(k.abs().max()) and float(st["v"]) == float(v.abs().max())
    assert float(st["logits"]) == pytest.approx(float(logits[mask.expand_as(logits)].abs().max()), rel=1e-5)
    assert float(st["probs"]) == pytest.approx(float(probs.max()), rel=1e-6)
    assert float(st["av"]) == float(st["probs"])          # no decode rows: normalised probabilities


def test_attention_stats_over_the_paged_cache():
    """Prefill then a decode over herd's paged KV cache: the decode row's keys come from the cache,
    it does not touch the softmax statistics, and it sets matmul_av's input to 1 (vLLM-HPU feeds
    exp(s - block max) there on decodes)."""
    from herd.attention.backends.reference import ReferenceAttentionBackend
    from herd.attention.metadata import CommonAttentionMetadata, make_metadata
    from herd.quant.methods.inc_attention import attention_stats

    torch.manual_seed(1)
    layer = _attention_layer()
    backend = ReferenceAttentionBackend()
    caches = [(torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8))]
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    table = {"full": torch.tensor([[0, 1]], dtype=torch.int32)}

    def step(rows, first, seq_len):
        slots = {"full": torch.arange(first, first + len(rows))}
        common = CommonAttentionMetadata.from_host([0, len(rows)], [seq_len], table, slots, 4)
        meta = make_metadata(backend, common, {"full": None}, caches)
        layer(q[rows], k[rows], v[rows], torch.arange(first, first + len(rows)), meta)
        return attention_stats(layer, q[rows], k[rows], v[rows], torch.arange(first, first + len(rows)), meta)

    prefill = step(list(range(5)), 0, 5)
    ref = attention_stats(layer, q[:5], k[:5], v[:5], torch.arange(5), None)
    assert all(float(prefill[n]) == pytest.approx(float(ref[n]), rel=1e-6) for n in ref)
    decode = step([5], 5, 6)
    assert float(decode["k"]) == float(k.abs().max())     # the whole cached context
    assert float(decode["logits"]) == 0.0 and float(decode["probs"]) == 0.0 and float(decode["av"]) == 1.0


def test_pandas_pickle_loads_with_one_line_warnings(tmp_path, monkeypatch, capsys):
    """`herd calibrate -d data.pkl` with a pickled DataFrame: pandas (the `calibrate` extra) reads it,
    and the pickle warning is one readable line, not Python's two-line warning format."""
    import tomllib

    import pandas as pd

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("pandas") for r in extras["optional-dependencies"]["calibrate"])
    data = tmp_path / "d.pkl"
    pd.DataFrame(ROWS).to_pickle(data)
    monkeypatch.setattr(cli, "load_tokenizer", lambda path: _Tok())
    monkeypatch.setattr(cli, "measure", lambda *a, **k: None)
    assert cli.run(_args(tmp_path, data)) == 1       # the fake measure step writes nothing
    err = capsys.readouterr().err.splitlines()
    warn = [line for line in err if line.startswith("warning:")]
    assert len(warn) == 1 and "unpickling can run arbitrary code" in warn[0]
    assert not any("warnings.warn" in line or "UserWarning" in line for line in err)


@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_registered_nodes_equal_what_inc_selects_in_vllm_hpu(variant, request):
    """herd's nodes for a tiny Llama 4 (all-MoE and interleaved dense / MoE) are the modules INC's
    should_quantize selects in vLLM-HPU's module tree, under calibrate_model.sh's config and under
    herd's (recorded in tests/data/inc_reference.json)."""
    from herd.model.loader import load_model

    model = load_model(request.getfixturevalue(f"{variant}_dir"), dtype=torch.float32)
    ref = json.loads((Path(__file__).parent / "data" / "inc_reference.json").read_text())["vllm_hpu_nodes"][variant]
    for label, config in (("default", cfg(mode="MEASURE")),
                          ("herd_config", cfg(mode="MEASURE", blocklist=cli.BLOCKLIST))):
        col = MeasurementCollector(config)
        nodes = [n.name for n in col.add_model(model)]
        expected = set(ref[f"measured_{label}"])
        if label == "default":   # herd does not measure vLLM-HPU's flat-PA block matmuls and fused SDPA
            expected = {n for n in expected if not n.endswith(("batch2block_matmul", "block2batch_matmul",
                                                                "fused_scaled_dot_product_attention"))}
        assert set(nodes) == expected, label
        assert sorted(col.mod_list) == sorted(n for n in ref[f"mod_list_{label}"] if n in expected or
                                              n.endswith(".experts"))
