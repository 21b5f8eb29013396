"""Models for benchmarks/gpu_check.py: random-weight checkpoints that need no download.

* `write_config_checkpoint` writes an HF folder with config.json, a word-level tokenizer covering
  the whole vocabulary (every sampled id detokenizes to text, as with a real tokenizer) and
  generation_config.json, but no weights.
* `random_weights()` patches the engine's model loader so that LLM(...) builds the model directly
  on its device and fills it with random values instead of reading safetensors (writing and reading
  tens of GB would take longer than the whole check). Quantization (online FP8) then runs on the
  device as it would after a normal load.
* `tiny_checkpoint` builds a tiny real HF Llama 4 checkpoint with transformers (tests/tiny_models).
* `layers_that_fit` sizes a model to a memory budget from the planner's own weight counts.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(1, REPO)


def scout_text_config(num_layers: int, **over) -> dict:
    """Llama 4 Scout's text config (the planner's built-in), with `num_layers` layers: hidden 5120,
    16 routed experts of 8192 + a shared expert, top-1, 40 / 8 heads of 128, vocab 202048,
    chunked attention of 8192 with NoPE every 4th layer."""
    from herd.plan.models import builtin_config

    text = dict(builtin_config("scout")["text_config"])
    # herd reads attn_temperature_tuning as a bool; transformers' config class (which AutoTokenizer
    # loads) insists on one, although the released checkpoint stores 4
    text.update(num_hidden_layers=int(num_layers), architectures=["Llama4ForCausalLM"],
                attn_temperature_tuning=True, **over)
    return text


def tiny_perf_text_config(num_layers: int) -> dict:
    """A CPU-sized stand-in for scout_text_config (same structure, tiny widths), for --cpu-smoke."""
    return scout_text_config(num_layers, hidden_size=64, intermediate_size=96, intermediate_size_mlp=128,
                             num_local_experts=4, num_attention_heads=10, num_key_value_heads=2,
                             head_dim=16, vocab_size=512, attention_chunk_size=32,
                             rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 1.0, "original_max_position_embeddings": 64},
                             bos_token_id=1, eos_token_id=[2], pad_token_id=0)


def weight_bytes_bf16(text_cfg: dict) -> int:
    """Bytes of the text model's weights in BF16, from the planner's weight groups."""
    from herd.plan.models import spec_from_dict
    from herd.plan.params import weight_bytes_per_device

    spec = spec_from_dict(dict(text_cfg), "gpu-check", "gpu-check")
    return weight_bytes_per_device(spec.groups, "bf16", 1)


def layers_that_fit(make_config, budget_bytes: int) -> tuple[int, int, int]:
    """Largest layer count whose BF16 weights fit `budget_bytes`.
    Returns (layers, bytes of everything but the layers, bytes per layer)."""
    one, two = weight_bytes_bf16(make_config(1)), weight_bytes_bf16(make_config(2))
    per_layer = two - one
    base = one - per_layer
    return max(1, (int(budget_bytes) - base) // per_layer), base, per_layer


def save_wordlevel_tokenizer(path: str, vocab_size: int, bos: int = 1, eos: int = 2, pad: int = 0) -> None:
    """A tokenizer whose vocabulary is exactly ids 0..vocab_size-1 ("t<id>", whitespace-split), so
    that random sampled ids detokenize cheaply; ids 0..7 are special."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {(f"<s{i}>" if i < 8 else f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s3>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"<s{bos}>", eos_token=f"<s{eos}>",
                                   pad_token=f"<s{pad}>", unk_token="<s3>")
    fast.save_pretrained(path)


def write_config_checkpoint(path: str, text_cfg: dict) -> str:
    """An HF folder with everything LLM(...) reads except the weights (see random_weights)."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(text_cfg)
    cfg.setdefault("model_type", "llama4_text")
    cfg.setdefault("architectures", ["Llama4ForCausalLM"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    eos = cfg.get("eos_token_id") or [2]
    eos = eos if isinstance(eos, list) else [eos]
    bos, pad = cfg.get("bos_token_id") or 1, cfg.get("pad_token_id") or 0
    # special ids of the real Scout config are ~200000; the word-level tokenizer keeps its own 0..7
    save_wordlevel_tokenizer(path, int(cfg["vocab_size"]),
                             bos=bos if bos < 8 else 1, eos=eos[0] if eos[0] < 8 else 2, pad=pad if pad < 8 else 0)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}, f)
    return path


def _random_load_model(path, dtype=None, device="cpu", tp=None, quant=None, expert_parallel=False,
                       config=None, weights=None, multimodal=False, *, std: float = 0.02, seed: int = 0):
    """Drop-in for herd.model.loader.load_model: construct on `device`, fill every matrix with
    N(0, std) and every vector (norm weights) with ones, then run the quant methods' post-load step
    (online FP8 quantizes here, on the device)."""
    import torch

    from herd.model.config import Llama4TextConfig
    from herd.model.llama4 import Llama4ForCausalLM
    from herd.model.loader import process_weights_after_loading
    from herd.parallel.context import SINGLE

    cfg = config or Llama4TextConfig.from_pretrained(path)
    dev = torch.device(device)
    with torch.device(dev):
        model = Llama4ForCausalLM(cfg, dtype=dtype or torch.bfloat16, tp=tp or SINGLE, quant=quant,
                                  expert_parallel=expert_parallel)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.dtype.is_floating_point and p.element_size() >= 2:
                p.normal_(0.0, std, generator=gen)
            elif p.dtype.is_floating_point and p.element_size() >= 2:
                p.fill_(1.0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    process_weights_after_loading(model)
    if quant is not None:
        quant.post_load(model)
    return model.to(dev).eval()


@contextlib.contextmanager
def random_weights(std: float = 0.02, seed: int = 0):
    """While active, the ModelRunner builds random-weight models on its device (no weight files)."""
    import herd.engine.runner as runner_mod

    original = runner_mod.load_model

    def load(*args, **kwargs):
        return _random_load_model(*args, std=std, seed=seed, **kwargs)

    runner_mod.load_model = load
    try:
        yield
    finally:
        runner_mod.load_model = original


def tiny_checkpoint(path: str, variant: str, **over) -> str:
    """tests/tiny_models.make_tiny_checkpoint: a tiny random HF Llama 4 ("scout" or "maverick")."""
    from tests.tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(path, variant, **over)


def shutdown_llm(llm) -> None:
    """Stop an engine's executor. The caller then drops its last reference and calls collect()."""
    executor = getattr(getattr(llm, "llm_engine", None), "executor", None)
    if executor is not None and hasattr(executor, "shutdown"):
        executor.shutdown()


def collect() -> None:
    """Garbage-collect and return cached device memory (after the last engine reference is gone)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
