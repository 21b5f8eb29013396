"""The embedded default model: files, sizes, config features, tokenizer, chat template, and that it speaks English."""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest

import herd
from herd.model.config import Llama4TextConfig

MODEL_DIR = Path(herd.__file__).parent / "assets" / "default"
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
MAX_WEIGHT_BYTES = 16_000_000
COMMON_WORDS = {
    "the", "and", "of", "unto", "to", "that", "he", "his", "in", "shall", "a", "is", "was", "for", "them", "they",
    "i", "my", "lord", "god", "be", "not", "with", "all", "it", "thou", "thy", "will", "which", "him", "said",
    "upon", "me", "are", "have", "from", "their", "ye", "you", "as", "by", "out", "were", "this", "there",
}


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _is_english(text: str) -> bool:
    words = text.split()
    plain = [w for w in words if re.fullmatch(r"[A-Za-z]+('s)?[,.;:?!]*", w)]
    common = [w for w in plain if w.strip(",.;:?!").lower() in COMMON_WORDS]
    return len(words) >= 8 and len(plain) >= 0.8 * len(words) and len(common) >= 3 and len(set(plain)) >= 5


@pytest.fixture(scope="module")
def config() -> Llama4TextConfig:
    return Llama4TextConfig.from_pretrained(str(MODEL_DIR))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, local_files_only=True).eval()


def test_folder_has_all_files_within_size_limit():
    for name in FILES:
        assert (MODEL_DIR / name).is_file(), f"missing {name} in {MODEL_DIR}"
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= MAX_WEIGHT_BYTES
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    assert raw["model_type"] == "llama4_text"
    assert raw["architectures"] == ["Llama4ForCausalLM"]


def test_config_exercises_every_llama4_text_feature(config):
    L = config.num_hidden_layers
    moe = [i for i in range(L) if config.is_moe_layer(i)]
    rope = [i for i in range(L) if config.is_rope_layer(i)]
    assert 0 < len(moe) < L, "needs both MoE and dense layers"
    assert config.num_local_experts > config.num_experts_per_tok >= 1
    assert config.intermediate_size_mlp != config.intermediate_size
    assert 0 < len(rope) < L, "needs both RoPE (chunked) and NoPE layers"
    assert config.use_qk_norm and config.attn_temperature_tuning
    assert config.attention_chunk_size is not None and config.attention_chunk_size < config.max_position_embeddings
    # temperature tuning changes queries from position floor_scale - 1 on: well inside the trained context
    assert config.floor_scale <= 64
    assert config.rope_scaling and config.rope_scaling.get("rope_type", config.rope_scaling.get("type")) == "llama3"
    assert not config.tie_word_embeddings
    assert config.num_attention_heads > config.num_key_value_heads  # GQA


def test_weights_match_config(config):
    header = _safetensors_header(MODEL_DIR / "model.safetensors")
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    n_params = sum(math.prod(v["shape"]) for v in header.values())
    assert 1_000_000 <= n_params <= 8_000_000
    D, E, I = config.hidden_size, config.num_local_experts, config.intermediate_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.feed_forward."
        if config.is_moe_layer(i):
            assert header[p + "experts.gate_up_proj"]["shape"] == [E, D, 2 * I]
            assert header[p + "experts.down_proj"]["shape"] == [E, I, D]
            assert header[p + "router.weight"]["shape"] == [E, D]
            assert header[p + "shared_expert.gate_proj.weight"]["shape"] == [I, D]
        else:
            assert header[p + "gate_proj.weight"]["shape"] == [config.intermediate_size_mlp, D]
    assert header["lm_head.weight"]["shape"] == [config.vocab_size, D]


def test_tokenizer_offline_special_tokens_and_chat_template(config, tokenizer):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    assert raw.get_vocab_size() == config.vocab_size == len(tokenizer)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>",
                "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                "<|tile_x_separator|>", "<|tile_y_separator|>"]
    for s in specials:
        assert raw.encode(s, add_special_tokens=False).ids == [raw.token_to_id(s)], s
    eot, eos = raw.token_to_id("<|eot|>"), raw.token_to_id("<|end_of_text|>")
    assert config.bos_token_id == raw.token_to_id("<|begin_of_text|>")
    assert {eot, eos} <= set(config.eos_token_id)
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert {eot, eos} <= set(gen["eos_token_id"])
    text = "And God said, Let there be light: and there was light."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    messages = [{"role": "system", "content": " You are a helpful assistant. "},
                {"role": "user", "content": "What is the capital of France?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a helpful assistant.<|eot|>"
                        "<|header_start|>user<|header_end|>\n\nWhat is the capital of France?<|eot|>"
                        "<|header_start|>assistant<|header_end|>\n\n")
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
             {"role": "assistant", "content": "Hello!"}]
    assert tokenizer.apply_chat_template(image, tokenize=False) == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>Describe this image.<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHello!<|eot|>")


def test_transformers_greedy_generation_is_english(model, tokenizer):
    import torch

    ids = tokenizer("And God said unto Noah,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert _is_english(text), text


def test_transformers_chat_reply_is_english(model, tokenizer):
    import torch

    enc = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about Moses."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(enc["input_ids"], max_new_tokens=30, do_sample=False)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert _is_english(text), text
