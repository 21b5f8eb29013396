import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.model.config import Llama4TextConfig
from herd.model.loader import load_model


def _reshard(src, dst, per_expert=False, drop=None, extra=None, bad_shape=None):
    """Rewrite a checkpoint as 2 shards with an index, optionally per-expert / broken."""
    os.makedirs(dst, exist_ok=True)
    sd = load_file(os.path.join(src, "model.safetensors"))
    if per_expert:
        for name in [n for n in sd if n.endswith("experts.gate_up_proj")]:
            gu, down = sd.pop(name), sd.pop(name.replace("gate_up_proj", "down_proj"))
            inter = gu.shape[-1] // 2
            for e in range(gu.shape[0]):
                base = name.replace("gate_up_proj", str(e))
                sd[f"{base}.gate_proj.weight"] = gu[e, :, :inter].t().contiguous()
                sd[f"{base}.up_proj.weight"] = gu[e, :, inter:].t().contiguous()
                sd[f"{base}.down_proj.weight"] = down[e].t().contiguous()
    if drop:
        sd.pop(drop)
    if extra:
        sd[extra] = torch.zeros(3)
    if bad_shape:
        sd[bad_shape] = torch.zeros(7, 7)
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, os.path.join(dst, fn))
        weight_map.update({n: fn for n in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return dst


def _logits(model, n=16):
    ids = torch.arange(3, 3 + n)
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(n)))


def test_sharded_and_per_expert_layouts_load_identically(scout_dir, tmp_path):
    ref = _logits(load_model(scout_dir, dtype=torch.float32))
    sharded = _reshard(scout_dir, tmp_path / "sharded")
    per_exp = _reshard(scout_dir, tmp_path / "per_expert", per_expert=True)
    assert torch.equal(_logits(load_model(sharded, dtype=torch.float32)), ref)
    assert torch.allclose(_logits(load_model(per_exp, dtype=torch.float32)), ref, atol=1e-6)


def test_missing_unexpected_and_bad_shapes_are_reported(scout_dir, tmp_path):
    with pytest.raises(ValueError, match="missing"):
        load_model(_reshard(scout_dir, tmp_path / "a", drop="model.layers.1.self_attn.o_proj.weight"))
    with pytest.raises(ValueError, match="unexpected"):
        load_model(_reshard(scout_dir, tmp_path / "b", extra="model.layers.0.mystery.weight"))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(_reshard(scout_dir, tmp_path / "c", bad_shape="model.layers.0.self_attn.o_proj.weight"))


def test_dtype_selection(scout_dir):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = load_model(scout_dir, dtype=dtype)
        assert model.model.layers[0].feed_forward.experts.w13_weight.dtype == dtype
        assert _logits(model).dtype == dtype


def test_config_parsing_of_real_layouts():
    maverick = {"architectures": ["Llama4ForConditionalGeneration"],
                "text_config": {"num_hidden_layers": 48, "interleave_moe_layer_step": 2,
                                "num_local_experts": 128, "use_qk_norm": False, "rope_scaling": None},
                "vision_config": {}}
    cfg = Llama4TextConfig.from_dict(maverick)
    assert cfg.multimodal and cfg.moe_layers == list(range(1, 48, 2))
    assert [i for i in range(48) if not cfg.is_rope_layer(i)] == list(range(3, 48, 4))
    scout = Llama4TextConfig.from_dict({"num_hidden_layers": 48, "rope_scaling": {
        "rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192}})
    assert scout.moe_layers == list(range(48)) and scout.rope_scaling["factor"] == 16.0


def test_llama3_scaling_splits_at_pair_35():
    from herd.model.layers import RotaryEmbedding
    plain = RotaryEmbedding(128, 500000.0, None).inv_freq
    scaled = RotaryEmbedding(128, 500000.0, {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 1.0,
                                             "original_max_position_embeddings": 8192}).inv_freq
    assert torch.equal(scaled[:35], plain[:35])
    assert torch.allclose(scaled[35:], plain[35:] / 16)
