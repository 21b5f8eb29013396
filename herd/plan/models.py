"""What the planner plans for: a built-in Llama 4 config or any HF config.json, parsed.

The built-in configs carry the architectural fields of the two Instruct checkpoints
(meta-llama/Llama-4-{Scout-17B-16E,Maverick-17B-128E}-Instruct); the planner needs no download.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from herd.model.config import Llama4TextConfig
from herd.plan.params import VisionConfig, WeightGroup, weight_groups

BUILTIN_NAMES = ("scout", "maverick")
_HF_IDS = MappingProxyType({"scout": "meta-llama/Llama-4-Scout-17B-16E-Instruct",
                            "maverick": "meta-llama/Llama-4-Maverick-17B-128E-Instruct"})


def builtin_config(name: str) -> dict[str, Any]:
    """A fresh config.json-shaped dict for "scout" or "maverick"."""
    text = {
        "model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 202048, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_experts_per_tok": 1, "no_rope_layer_interval": 4, "attention_chunk_size": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "attn_scale": 0.1, "floor_scale": 8192,
        "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018,
        "torch_dtype": "bfloat16",
    }
    if name == "scout":
        text.update(num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
                    attn_temperature_tuning=4, max_position_embeddings=10485760,
                    rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})
    elif name == "maverick":
        text.update(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                    max_position_embeddings=1048576, rope_scaling=None)
    else:
        raise ValueError(f"no built-in config {name!r}; built-ins are {', '.join(BUILTIN_NAMES)}")
    vision = {
        "model_type": "llama4_vision_model", "hidden_size": 1408, "num_hidden_layers": 34,
        "num_attention_heads": 16, "intermediate_size": 5632, "image_size": 336, "patch_size": 14,
        "num_channels": 3, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096,
        "projector_output_dim": 4096, "vision_output_dim": 4096, "rope_theta": 10000,
        "norm_eps": 1e-5, "hidden_act": "gelu", "multi_modal_projector_bias": False,
    }
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "_name_or_path": _HF_IDS[name], "text_config": text, "vision_config": vision,
            "boi_token_index": 200080, "eoi_token_index": 200081, "image_token_index": 200092,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@dataclass
class ModelSpec:
    name: str
    source: str                     # "built-in" or the config.json path
    text: Llama4TextConfig
    vision: VisionConfig | None
    checkpoint_dtype: str           # weight precision the checkpoint is stored in: bf16 | fp8 | int4
    groups: list[WeightGroup] = field(init=False, repr=False)

    def __post_init__(self):
        self.groups = weight_groups(self.text, self.vision)


def _checkpoint_dtype(cfg: dict[str, Any]) -> str:
    q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if not q:
        return "bf16"
    method = str(q.get("quant_method", "")).lower()
    bits = q.get("bits") or q.get("num_bits")
    for group in (q.get("config_groups") or {}).values():
        bits = bits or (group.get("weights") or {}).get("num_bits")
    if method in ("fp8", "fbgemm_fp8", "modelopt") or (method == "compressed-tensors" and bits == 8):
        return "fp8"
    if bits == 4:
        return "int4"
    raise ValueError(f"cannot tell the weight precision of quantization_config {q}; pass --dtype")


def _builtin_name(model: str) -> str | None:
    key = model.strip().lower()
    if key in BUILTIN_NAMES:
        return key
    for name, hf_id in _HF_IDS.items():  # the HF id (without -Instruct too) also names the built-in
        if key in (hf_id.lower(), hf_id.lower().removesuffix("-instruct")):
            return name
    return None


def spec_from_dict(cfg: dict[str, Any], name: str, source: str) -> ModelSpec:
    model_type = cfg.get("model_type")
    if model_type is not None and model_type not in ("llama4", "llama4_text"):
        raise ValueError(f"{source}: model_type {model_type!r} is not a Llama 4 config "
                         "(expected llama4 or llama4_text)")
    vision = cfg.get("vision_config")
    return ModelSpec(name=name, source=source, text=Llama4TextConfig.from_dict(cfg),
                     vision=VisionConfig.from_dict(vision) if vision else None,
                     checkpoint_dtype=_checkpoint_dtype(cfg))


def load_model_spec(model: str) -> ModelSpec:
    """`model` is "scout", "maverick", a checkpoint folder, or a config.json path."""
    if not os.path.exists(model):
        name = _builtin_name(model)
        if name is None:
            raise FileNotFoundError(f"--model {model!r} is neither a built-in "
                                    f"({', '.join(BUILTIN_NAMES)}) nor an existing folder or config.json")
        return spec_from_dict(builtin_config(name), _HF_IDS[name].split("/")[-1], "built-in")
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    name = cfg.get("_name_or_path") or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return spec_from_dict(cfg, os.path.basename(str(name).rstrip("/")) or path, path)
