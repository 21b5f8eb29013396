import json

import pytest

from herd.cli import main
from herd.plan.hardware import GiB, get_device
from herd.plan.memory import PlanSettings, kv_cache_layout, plan_memory, recommend_tp
from herd.plan.models import load_model_spec, spec_from_dict
from herd.plan.params import bytes_read_per_device, count_params, experts_touched, weight_bytes
from herd.plan.planner import make_plan
from herd.plan.roofline import decode_estimate, linear_seconds_per_token, prefill_estimate

TINY_TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, vocab_size=300, intermediate_size=32, intermediate_size_mlp=96,
                 num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                 attention_chunk_size=8, max_position_embeddings=256)
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   image_size=56, patch_size=14, num_channels=3, projector_input_dim=40,
                   projector_output_dim=48, vision_output_dim=56, pixel_shuffle_ratio=0.5)


@pytest.fixture(scope="module")
def scout():
    return load_model_spec("scout")


@pytest.fixture(scope="module")
def maverick():
    return load_model_spec("maverick")


def test_builtin_param_counts_match_spec(scout, maverick):
    s, m = count_params(scout.groups), count_params(maverick.groups)
    assert s.total_params == 108_641_793_536
    assert m.total_params == 401_583_781_376
    assert s.active_params == 17_172_894_720
    assert m.active_params == 17_184_691_200
    assert s.active_params_no_embedding == 16_138_408_960
    for c in (s, m):
        assert c.total["embedding"] == c.total["lm_head"] == 1_034_485_760
        assert c.total["attention"] + c.total["norms"] == 3_020_390_400 + 5120  # + final norm
        assert c.total["vision"] == 850_960_896 and c.total["projector"] == 20_971_520
        assert c.active["vision"] == 0
    assert s.total["routed_experts"] == 96_636_764_160 and m.total["routed_experts"] == 386_547_056_640
    assert s.total["shared_experts"] == 6_039_797_760 and m.total["shared_experts"] == 3_019_898_880
    assert s.total["router"] == 3_932_160 and m.total["router"] == 15_728_640
    assert s.total["dense_mlp"] == 0 and m.total["dense_mlp"] == 6_039_797_760
    assert sum(weight_bytes(scout.groups, "bf16").values()) == 217_283_587_072
    assert sum(weight_bytes(maverick.groups, "bf16").values()) == 803_167_562_752


def test_hf_model_id_resolves_to_builtin():
    spec = load_model_spec("meta-llama/Llama-4-Maverick-17B-128E-Instruct")
    assert spec.text.num_local_experts == 128 and spec.source == "built-in"


def _hf_category(name: str) -> str:
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("multi_modal_projector."):
        return "projector"
    for key, cat in (("embed_tokens", "embedding"), ("lm_head", "lm_head"), ("self_attn", "attention"),
                     ("router", "router"), ("shared_expert", "shared_experts"), ("experts", "routed_experts"),
                     ("feed_forward", "dense_mlp"), ("norm", "norms")):
        if key in name:
            return cat
    raise AssertionError(f"unmapped parameter {name}")


def test_counts_match_transformers_model(tmp_path):
    """Per-category counts equal the parameters of the transformers model for the same config.json."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    cfg = Llama4Config(text_config=TINY_TEXT, vision_config=TINY_VISION)
    with torch.device("meta"):
        hf = Llama4ForConditionalGeneration(cfg)
    expected: dict[str, int] = {}
    for name, p in hf.named_parameters():
        expected[_hf_category(name)] = expected.get(_hf_category(name), 0) + p.numel()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    spec = load_model_spec(str(tmp_path))
    got = {k: v for k, v in count_params(spec.groups).total.items() if v}
    assert got == expected
    assert spec.vision is not None and spec.text.moe_layers == [1, 3]

    # a bare llama4_text config (no vision), with tied embeddings
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    text_cfg = Llama4TextConfig(**TINY_TEXT, tie_word_embeddings=True)
    with torch.device("meta"):
        hf_text = Llama4ForCausalLM(text_cfg)
    spec = spec_from_dict(text_cfg.to_dict(), "tiny", "test")
    assert spec.vision is None
    assert count_params(spec.groups).total_params == sum(p.numel() for p in hf_text.parameters())


def test_fp8_recipe_keeps_attention_router_head_vision_in_bf16(scout):
    bf16, fp8 = weight_bytes(scout.groups, "bf16"), weight_bytes(scout.groups, "fp8")
    for cat in ("embedding", "attention", "router", "norms", "lm_head", "vision", "projector"):
        assert fp8[cat] == bf16[cat]
    D, I, E, M = 5120, 8192, 16, 48
    # one byte per quantized weight plus a BF16 scale per output channel (gate, up: I rows; down: D)
    assert fp8["routed_experts"] == bf16["routed_experts"] // 2 + 2 * M * E * (2 * I + D)
    assert fp8["shared_experts"] == bf16["shared_experts"] // 2 + 2 * M * (2 * I + D)
    int4 = weight_bytes(scout.groups, "int4")
    assert int4["routed_experts"] == bf16["routed_experts"] // 4 + 2 * M * E * (2 * I * D // 128 + D * I // 128)


def test_kv_cache_bytes_follow_chunked_layout(scout):
    kv = kv_cache_layout(scout.text, 1, "auto")
    assert (kv.full_layers, kv.chunked_layers, kv.chunk_size) == (12, 36, 8192)
    assert kv.bytes_per_token_in_chunk == 48 * 4096 and kv.bytes_per_token_past_chunk == 12 * 4096
    assert kv.bytes_for(8192) == 1.5 * GiB
    assert kv.bytes_for(131072) == 7.125 * GiB
    assert kv.bytes_for(1 << 20) == 49.125 * GiB
    assert kv_cache_layout(scout.text, 1, "fp8").bytes_for(1 << 20) * 2 == kv.bytes_for(1 << 20)
    assert kv_cache_layout(scout.text, 8, "auto").bytes_for(1 << 20) * 8 == kv.bytes_for(1 << 20)
    for n in (1, 100, 8191, 8192, 8193, 100_000):
        assert kv.max_tokens(kv.bytes_for(n)) == n
        assert kv.max_tokens(kv.bytes_for(n) - 1) == n - 1


def test_kv_heads_replicate_past_num_kv_heads():
    spec = spec_from_dict(dict(TINY_TEXT), "tiny", "test")
    per_head = 2 * spec.text.head_dim * 2
    assert kv_cache_layout(spec.text, 2, "auto").bytes_per_token_layer == per_head
    assert kv_cache_layout(spec.text, 4, "auto").bytes_per_token_layer == per_head


def test_seed_claims(scout, maverick):
    bf16 = PlanSettings()
    gaudi3, h100 = get_device("gaudi3"), get_device("h100")
    assert not plan_memory(scout, gaudi3, 1, bf16).fits
    assert plan_memory(scout, gaudi3, 2, bf16).fits
    assert recommend_tp(scout, gaudi3, bf16).tp == 2
    rec = recommend_tp(maverick, h100, bf16)
    assert rec.tp is None and not rec.plans[-1].fits and rec.plans[-1].tp == 8
    assert "at least 11 cards" in rec.reason
    fp8 = PlanSettings(dtype="fp8")
    assert plan_memory(maverick, h100, 8, fp8).fits
    assert recommend_tp(maverick, h100, fp8).tp == 8


def test_memory_plan_is_consistent(scout):
    s = PlanSettings(max_model_len=32768, max_num_seqs=8)
    p = plan_memory(scout, get_device("h200"), 4, s)
    assert p.budget_bytes == int(0.9 * 141 * GiB)
    assert p.kv_budget_bytes == p.budget_bytes - p.weight_bytes - p.workspace.total
    assert p.kv_bytes_per_seq == p.kv.bytes_for(32768)
    assert p.max_concurrent_seqs * p.kv_bytes_per_seq <= p.kv_budget_bytes
    assert (p.max_concurrent_seqs + 1) * p.kv_bytes_per_seq > p.kv_budget_bytes
    assert p.batch_size == 8 < p.max_concurrent_seqs
    assert p.kv.bytes_for(p.max_context_len) <= p.kv_budget_bytes < p.kv.bytes_for(p.max_context_len + 1)
    # a larger TP holds less weight per device and more KV room
    p8 = plan_memory(scout, get_device("h200"), 8, s)
    assert p8.weight_bytes < p.weight_bytes and p8.max_concurrent_seqs > p.max_concurrent_seqs


def test_bad_input_raises_clear_errors(scout):
    with pytest.raises(ValueError, match="valid sizes"):
        plan_memory(scout, get_device("h100"), 3, PlanSettings())
    with pytest.raises(ValueError, match="unknown device"):
        get_device("tpu-v5")
    with pytest.raises(ValueError, match="max-model-len"):
        make_plan(scout, get_device("h100"), PlanSettings(max_model_len=20_000_000))
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_model_spec("no-such-model")
    with pytest.raises(ValueError, match="not a Llama 4 config"):
        spec_from_dict({"model_type": "llama"}, "x", "test")
    assert get_device("Gaudi-3").key == "gaudi3"
    assert get_device("gaudi2").fp8_max == 240
    assert get_device("gaudi3").fp8_max == get_device("h100").fp8_max == 448


def test_experts_touched():
    assert experts_touched(16, 1, 1) == pytest.approx(1.0)
    assert experts_touched(128, 1, 4) < 4
    assert experts_touched(16, 1, 10_000) == pytest.approx(16.0)


def test_decode_roofline_batch1_reads_active_weights(scout):
    h100 = get_device("h100")
    read = bytes_read_per_device(scout.groups, "bf16", 1, 1, 16, 1)
    # one embedding row, all active matmul weights, nothing of the vision tower
    assert read == pytest.approx(2 * (count_params(scout.groups).active_params_no_embedding + 5120))
    kv = kv_cache_layout(scout.text, 1, "auto")
    d = decode_estimate(scout, h100, "bf16", 1, kv, 1, 8192)
    assert d.step.bound == "memory"
    assert d.step.time_s == pytest.approx((read + kv.bytes_for(8192)) / 3.35e12)
    big = decode_estimate(scout, h100, "bf16", 1, kv, 64, 8192)
    assert big.tokens_per_s == pytest.approx(64 * big.tokens_per_s_per_seq)
    assert big.tokens_per_s > d.tokens_per_s and big.tokens_per_s_per_seq < d.tokens_per_s_per_seq


def test_prefill_roofline_respects_peak_flops(scout):
    gaudi3 = get_device("gaudi3")
    kv = kv_cache_layout(scout.text, 2, "auto")
    per_token = linear_seconds_per_token(scout, gaudi3, "bf16", 2)
    active = count_params(scout.groups).active_params_no_embedding
    assert per_token * 2 * 1835e12 == pytest.approx(2 * active, rel=1e-3)
    f = prefill_estimate(scout, gaudi3, "bf16", 2, kv, 32768, 8192)
    assert f.time_s >= 32768 * per_token
    assert f.tokens_per_s == pytest.approx(32768 / f.time_s)
    fp8 = prefill_estimate(scout, get_device("h100"), "fp8", 2, kv, 32768, 8192)
    bf16 = prefill_estimate(scout, get_device("h100"), "bf16", 2, kv, 32768, 8192)
    assert fp8.time_s < bf16.time_s


def test_cli_text_recommends_tp(capsys):
    assert main(["plan", "--model", "scout", "--device", "gaudi3"]) == 0
    out = capsys.readouterr().out
    assert "108,641,793,536" in out and "17,172,894,720" in out
    assert "Recommended: TP=2" in out and "TP=1 would need" in out
    assert "tok/s/seq" in out and "prefill of one 8,192-token prompt" in out


def test_cli_json(capsys):
    rc = main(["plan", "--model", "maverick", "--device", "h100", "--dtype", "fp8",
               "--kv-cache-dtype", "fp8", "--max-model-len", "65536", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["total_params"] == 401_583_781_376
    assert data["recommended_tp"] == 8 and data["plan"]["fits"]
    assert data["settings"]["max_model_len"] == 65536
    assert data["plan"]["kv_bytes_per_token_past_chunk"] == 12 * 2 * 1 * 128 * 1
    assert "self_attn" in data["bf16_under_quant"]
    assert data["decode"][0]["batch_size"] == 1 and data["decode"][-1]["batch_size"] == data["plan"]["batch_size"]
    assert data["prefill"]["prompt_len"] == 65536


def test_cli_explicit_tp_that_does_not_fit(capsys):
    assert main(["plan", "--model", "maverick", "--device", "h100", "--tp", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recommended_tp"] is None and data["plan"]["tp"] == 8 and not data["plan"]["fits"]


def test_cli_reads_config_json_and_quantization(tmp_path, capsys):
    cfg = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
           "text_config": dict(TINY_TEXT), "vision_config": dict(TINY_VISION),
           "quantization_config": {"quant_method": "compressed-tensors",
                                   "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}}}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["plan", "--model", str(path), "--device", "a100", "--batch-size", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["dtype"] == "fp8" and data["model"]["checkpoint_dtype"] == "fp8"
    assert data["settings"]["max_model_len"] == 256  # min(max_position_embeddings, 8192)
    assert data["recommended_tp"] == 1 and [d["batch_size"] for d in data["decode"]] == [1, 4]


def test_cli_errors_and_device_list(capsys):
    assert main(["plan", "--model", "scout", "--device", "h100", "--tp", "3"]) == 2
    assert "valid sizes" in capsys.readouterr().err
    assert main(["plan", "--model", "scout"]) == 2
    assert "--device" in capsys.readouterr().err
    assert main(["plan", "--list-devices"]) == 0
    out = capsys.readouterr().out
    assert "gaudi2" in out and "mi300x" in out


def test_defaults_match_engine_config():
    from herd.config import CacheConfig, SchedulerConfig
    d = PlanSettings()
    sched = SchedulerConfig()
    sched.finalize(d.max_model_len)
    assert d.gpu_memory_utilization == CacheConfig().gpu_memory_utilization
    assert d.kv_cache_dtype == CacheConfig().kv_cache_dtype
    assert (d.max_num_seqs, d.max_num_batched_tokens) == (sched.max_num_seqs, sched.max_num_batched_tokens)
