"""The embedded default model through herd: same greedy tokens as transformers, used with no model."""
import torch

from herd import LLM, SamplingParams
from herd.hub.default import default_model_path
from tests.tiny_models import load_hf


def test_herd_matches_transformers_on_the_default_model():
    llm = LLM(dtype="float32", max_model_len=256, num_kv_blocks=16, block_size=16)  # no model: embedded
    assert llm.config.model.model == default_model_path()
    prompts = ["And God said", "In the beginning"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    hf = load_hf(default_model_path())
    for o in outs:
        ids = torch.tensor([o.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert o.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()
        words = o.outputs[0].text.split()
        assert len(words) >= 8 and sum(w.strip(",.;:").isalpha() for w in words) >= 0.7 * len(words)


def test_default_model_chats_in_english():
    llm = LLM(dtype="float32", max_model_len=256, num_kv_blocks=16, block_size=16)
    out = llm.chat([{"role": "user", "content": "Tell me about the shepherd."}],
                   SamplingParams(temperature=0.6, top_p=0.9, max_tokens=40, seed=0), use_tqdm=False)[0]
    words = out.outputs[0].text.split()
    assert len(words) >= 3 and sum(w.strip(",.;:!?").isalpha() for w in words) >= 0.7 * len(words)
