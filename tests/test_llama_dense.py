"""Dense Llama (LlamaForCausalLM, Llama 3 style) on herd's decoder vs transformers: config mapping,
rotate-half RoPE, prefill and paged decode logits, and greedy generation through the engine."""
import json
import os

import pytest
import torch

from herd import LLM, SamplingParams
from herd.model.config import Llama4TextConfig
from herd.model.layers import RotaryEmbedding
from herd.model.loader import load_model
from tests.test_model_parity import run_paged
from tests.tiny_models import save_tiny_tokenizer

LLAMA_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                  max_position_embeddings=256, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
VARIANTS = {
    # Llama 3.x: llama3 RoPE scaling, tied embeddings (Llama 3.2 1B/3B style)
    "llama3": dict(tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
    # plain RoPE, separate lm_head, MHA (no GQA)
    "plain": dict(tie_word_embeddings=False, num_key_value_heads=4),
}


def make_tiny_llama(path, variant: str, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**LLAMA_BASE, **VARIANTS[variant]})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.08)
    model.eval().save_pretrained(str(path), safe_serialization=True)
    save_tiny_tokenizer(str(path))
    return str(path)


def load_hf_llama(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def llama_dir(request, tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp(f"llama_{request.param}"), request.param)


def test_config_is_dense_llama(llama_dir):
    cfg = Llama4TextConfig.from_pretrained(llama_dir)
    L = cfg.num_hidden_layers
    assert cfg.moe_layers == [] and not any(cfg.is_moe_layer(i) for i in range(L))
    assert all(cfg.is_rope_layer(i) for i in range(L))
    assert cfg.attention_chunk_size is None and not cfg.use_qk_norm and not cfg.attn_temperature_tuning
    assert cfg.rope_style == "neox" and cfg.intermediate_size_mlp == cfg.intermediate_size == 96
    with open(os.path.join(llama_dir, "config.json")) as f:
        raw = json.load(f)
    assert cfg.tie_word_embeddings == raw["tie_word_embeddings"]
    assert (cfg.rope_scaling is not None) == (raw.get("rope_scaling") is not None
                                              or (raw.get("rope_parameters") or {}).get("rope_type") == "llama3")


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
def test_bias_is_rejected(key):
    raw = dict(LLAMA_BASE, model_type="llama", architectures=["LlamaForCausalLM"], **{key: True})
    with pytest.raises(ValueError, match=key):
        Llama4TextConfig.from_dict(raw)


def test_rope_styles_agree_up_to_row_permutation():
    """neox on HF rows == interleaved on llama.cpp-permuted rows (the GGUF layout)."""
    from herd.gguf.convert import permute_qk

    d, heads = 16, 3
    q = torch.randn(7, heads, d)
    pos = torch.arange(5, 12)
    neox = RotaryEmbedding(d, 10000.0, None, "neox")
    inter = RotaryEmbedding(d, 10000.0, None, "interleaved")
    q_neox, _ = neox(pos, q, q)
    perm = torch.from_numpy(permute_qk(torch.arange(heads * d).numpy(), heads))
    q_perm = q.reshape(7, -1)[:, perm].reshape(7, heads, d)
    q_inter, _ = inter(pos, q_perm, q_perm)
    assert torch.allclose(q_inter.reshape(7, -1), q_neox.reshape(7, -1)[:, perm], atol=1e-6)
    assert not torch.allclose(inter(pos, q, q)[0], q_neox, atol=1e-3)  # the styles do differ


def test_prefill_and_paged_decode_match_transformers(llama_dir):
    hf = load_hf_llama(llama_dir)
    model = load_model(llama_dir, dtype=torch.float32)
    assert type(model.model.layers[0].feed_forward).__name__ == "Llama4MLP"
    n = 40  # past original_max_position_embeddings=32 of the llama3 scaling
    ids = torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
        ours = model.compute_logits(model(ids, torch.arange(n)))
    assert (ours - ref).abs().max().item() <= 1e-4
    paged = run_paged(model, ids, [6, 9] + [1] * (n - 15), free_local=False)
    assert (paged - ref).abs().max().item() <= 1e-4


def test_engine_greedy_matches_transformers_generate(llama_dir):
    hf = load_hf_llama(llama_dir)
    llm = LLM(llama_dir, dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=96)
    assert llm.llm_engine.block_manager.groups == ["full"]
    prompts = ["The quick brown fox", "Mixture of experts routes each token to one expert"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, min_tokens=24), use_tqdm=False)
    for o in outs:
        ids = torch.tensor([o.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert o.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()
