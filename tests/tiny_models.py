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
    save_tiny_tokenizer(path)
    return path


def load_hf(path: str, dtype=torch.float32):
    from transformers import AutoConfig, Llama4ForCausalLM, Llama4ForConditionalGeneration

    with open(os.path.join(path, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    klass = Llama4ForConditionalGeneration if arch == "Llama4ForConditionalGeneration" else Llama4ForCausalLM
    model = klass.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


SPECIAL_TOKENS = ["<|finetune_right_pad|>", "<|begin_of_text|>", "<|eot|>", "<|header_start|>",
                  "<|header_end|>", "<|end_of_text|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{% if m['role'] == 'system' %}{{ m['content'] | trim }}{% else %}{{ m['content'] }}{% endif %}"
    "<|eot|>{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}")
_CORPUS = ["In the beginning was the word, and the word was with the herd.",
           "The quick brown fox jumps over the lazy dog while the llamas graze.",
           "héllo wörld, naïve café, 日本語のテキスト, emoji 🙂 and more text to learn merges from.",
           "Mixture of experts routes each token to one expert and a shared expert."] * 20


def save_tiny_tokenizer(path, vocab_size: int = 320):
    """Byte-level BPE with Llama 4 special tokens at ids 0..5 (pad, bos, eot=eos, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                                   pad_token="<|finetune_right_pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    with open(os.path.join(str(path), "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0}, f)
    return path


IMAGE_SPECIAL_TOKENS = ["<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
                        "<|image|>", "<|patch|>"]
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   image_size=56, patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=64,
                   projector_output_dim=64, vision_output_dim=64, rope_theta=10000)
TINY_TILE, TINY_MAX_TILES = 56, 4  # 4×4 patches per tile -> 4 <|patch|> tokens per tile after pixel shuffle


def make_tiny_multimodal_checkpoint(path, variant: str = "scout", seed: int = 0, **over) -> str:
    """Llama4ForConditionalGeneration with a real (tiny) vision tower, a tokenizer that has the
    image tokens, Llama 4's own chat template and a preprocessor_config.json with 56-pixel tiles."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, PreTrainedTokenizerFast
    from transformers.models.llama4.processing_llama4 import chat_template

    path = str(path)
    save_tiny_tokenizer(path)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": IMAGE_SPECIAL_TOKENS})
    tok.chat_template = chat_template
    tok.save_pretrained(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in IMAGE_SPECIAL_TOKENS}
    text = text_config_dict(variant, **over)
    if max(ids.values()) >= text["vocab_size"]:
        raise RuntimeError(f"image token ids {ids} do not fit the tiny vocabulary")
    torch.manual_seed(seed)
    cfg = Llama4Config(text_config=text, vision_config=dict(TINY_VISION),
                       image_token_index=ids["<|patch|>"], boi_token_index=ids["<|image_start|>"],
                       eoi_token_index=ids["<|image_end|>"])
    model = Llama4ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08 if p.dim() > 1 else 0.02)
            elif name.startswith("vision_model."):  # LayerNorm affine terms away from 1 / 0
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Llama4ImageProcessor", "size": {"height": TINY_TILE, "width": TINY_TILE},
                   "max_patches": TINY_MAX_TILES, "resize_to_max_canvas": False, "image_mean": [0.5] * 3,
                   "image_std": [0.5] * 3, "rescale_factor": 1 / 255}, f)
    return path
