"""Llama 4 MoE checkpoints built from SmolLM2's real weights (scripts/build_real_moe.py):
the "exact" construction must reproduce SmolLM2's dense output under non-trivial routing, and the
"distinct" one (routing changes the output) must match transformers' Llama4ForCausalLM."""
import importlib.util
import os

import pytest
import torch

from herd.hub.smollm2 import INSTALL_HINT, find_smollm2_gguf

pytestmark = pytest.mark.skipif(find_smollm2_gguf() is None or importlib.util.find_spec("gguf") is None,
                                reason=f"SmolLM2 is not installed ({INSTALL_HINT})")

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be")
LAYERS, EXPERTS = 4, 8


def _builder():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "build_real_moe.py")
    spec = importlib.util.spec_from_file_location("build_real_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    b = _builder()
    src = b.smollm2_folder()
    root = tmp_path_factory.mktemp("real_moe")
    return {"src": src,
            "dense": b.build_dense(src, str(root / "dense"), LAYERS),
            "exact": b.build_moe(src, str(root / "exact"), LAYERS, EXPERTS, "exact"),
            "distinct": b.build_moe(src, str(root / "distinct"), LAYERS, EXPERTS, "distinct")}


def _ids(folder):
    from herd.engine.tokenizer import get_tokenizer

    return torch.tensor(get_tokenizer(folder).encode(TEXT, add_special_tokens=False))


def _routing(model, ids):
    """Per MoE layer: the expert each token is routed to (recorded by a router hook)."""
    chosen = {}
    hooks = [layer.feed_forward.router.register_forward_hook(
        lambda m, a, out, i=i: chosen.__setitem__(i, out.argmax(-1).tolist()))
        for i, layer in enumerate(model.model.layers) if hasattr(layer.feed_forward, "router")]
    with torch.no_grad():
        logits = model.compute_logits(model(ids, torch.arange(len(ids))))
    for h in hooks:
        h.remove()
    return logits, chosen


def test_exact_moe_reproduces_dense_smollm2(built):
    from transformers import LlamaForCausalLM

    from herd.model.loader import load_model

    ids = _ids(built["dense"])
    moe = load_model(built["exact"], dtype=torch.float32)
    assert all(type(layer.feed_forward).__name__ == "Llama4MoE" for layer in moe.model.layers)
    logits, chosen = _routing(moe, ids)
    assert len(chosen) == LAYERS
    for layer, experts in chosen.items():
        assert len(set(experts)) >= 4, f"layer {layer}: routing collapsed onto {set(experts)}"
    hf = LlamaForCausalLM.from_pretrained(built["dense"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
    assert (logits - ref).abs().max().item() <= 5e-4  # logits reach ~70
    assert logits.argmax(-1).tolist() == ref.argmax(-1).tolist()
    # the routed half matters: without the experts the output is far from the dense model's
    for layer in moe.model.layers:
        layer.feed_forward.experts.w2_weight.data.zero_()
    with torch.no_grad():
        crippled = moe.compute_logits(moe(ids, torch.arange(len(ids))))
    assert (crippled - ref).abs().max().item() > 1.0


def test_distinct_moe_matches_transformers_llama4(built):
    from transformers import Llama4ForCausalLM

    from herd import LLM, SamplingParams
    from herd.model.loader import load_model

    ids = _ids(built["distinct"])
    model = load_model(built["distinct"], dtype=torch.float32)
    logits, chosen = _routing(model, ids)
    assert sorted(chosen) == [1, 3]
    assert all(len(set(e)) >= 3 for e in chosen.values())
    hf = Llama4ForCausalLM.from_pretrained(built["distinct"], dtype=torch.float32,
                                           attn_implementation="sdpa").eval()
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
    assert (logits - ref).abs().max().item() <= 5e-4  # logits reach ~70
    # through the engine: paged KV cache, chunked prefill, greedy decode
    llm = LLM(built["distinct"], dtype="float32", block_size=8, num_kv_blocks=32, max_model_len=128,
              max_num_batched_tokens=16)
    out = llm.generate({"prompt_token_ids": ids.tolist()}, SamplingParams(temperature=0, max_tokens=6, min_tokens=6),
                       use_tqdm=False)[0]
    with torch.no_grad():
        gen = hf.generate(ids[None], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.outputs[0].token_ids == gen[0, len(ids):].tolist()
