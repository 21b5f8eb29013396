"""Tiny random Llama 4 checkpoints built with transformers (the ground truth for parity tests)."""
from __future__ import annotations

import json
import os

import torch

TEXT_BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, intermediate_size_mlp=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_local_experts=4, num_experts_per_tok=1, rms_norm_eps=1e-5, max_position_embeddings=512,
    attention_chunk_size=8, floor_scale=4, attn_scale=0.1, attn_temperature_tuning=True,
    rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
VARIANTS = {
    # all-MoE, QK-norm, llama3 scaling with low == high (Scout)
    "scout": dict(interleave_moe_layer_step=1, use_qk_norm=True,
                  rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0,
                                    high_freq_factor=1.0, original_max_position_embeddings=64)),
    # dense/MoE interleaved, no QK-norm, plain RoPE (Maverick)
    "maverick": dict(interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None),
}


def text_config_dict(variant: str, **over) -> dict:
    cfg = dict(TEXT_BASE)
    cfg.update(VARIANTS[variant])
    cfg.update(over)
    return cfg


def make_tiny_checkpoint(path, variant: str, multimodal: bool = False, seed: int = 0, **over) -> str:
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    torch.manual_seed(seed)
    text = Llama4TextConfig(**text_config_dict(variant, **over))
    if multimodal:
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                      image_size=28, patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=64,
                      projector_output_dim=64, vision_output_dim=64, rope_theta=10000)
        cfg = Llama4Config(text_config=text.to_dict(), vision_config=vision, image_token_index=300,
                           boi_token_index=301, eoi_token_index=302)
        model = Llama4ForConditionalGeneration(cfg)
    else:
        model = Llama4ForCausalLM(text)
    # Random init is small; widen the weights so logits differ clearly between tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08 if p.dim() > 1 else 0.02)
    model.eval()
    path = str(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_hf(path: str, dtype=torch.float32):
    from transformers import AutoConfig, Llama4ForCausalLM, Llama4ForConditionalGeneration

    with open(os.path.join(path, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    klass = Llama4ForConditionalGeneration if arch == "Llama4ForConditionalGeneration" else Llama4ForCausalLM
    model = klass.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
