"""Build a random, Llama-4-shaped MoE text checkpoint (Llama4ForCausalLM) for CPU speed benchmarks.

The model has Llama 4 Scout's structure at a small size: every layer MoE (16 routed experts, top-1,
plus a shared expert; `--interleave-moe-layer-step 2` gives Maverick's dense/MoE interleave),
chunked-attention RoPE layers with a NoPE global-attention layer every 4th layer (no_rope_layers),
QK-norm on the RoPE layers, attention temperature tuning on the NoPE layers, llama3 RoPE
scaling (factor 16), GQA (8 query heads, 2 KV heads of 64). The attention chunk defaults to 128 tokens, smaller
than a 64 + 128 token benchmark sequence, so the chunked-attention path is exercised.

Weights are random normal (std --init-std, 0.05 ~ 1/sqrt(hidden): varied greedy outputs and tokens
spread over all experts; transformers' default 0.02 repeats one token) under a fixed seed; nothing
is downloaded. The folder is written with `save_pretrained`, so transformers (Llama4ForCausalLM) and herd load
the same files. The tokenizer is herd's embedded one (herd/assets/default: byte-level BPE, 4,096
tokens, so the vocabulary-to-hidden ratio is close to Llama 4's), or any tokenizer folder given
with --tokenizer (the vocabulary size follows it).

    python benchmarks/build_moe_checkpoint.py build/bench-moe [--seed 0] [--dtype float32] [--init-std 0.05]
        [--hidden-size 512] [--layers 8] [--experts 16] [--intermediate-size 1024]
        [--attention-chunk-size 128] [--interleave-moe-layer-step 1] [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


def default_tokenizer_dir() -> str:
    from herd.hub.default import default_model_path
    return default_model_path()


def tokenizer_info(tok_dir: str) -> dict:
    """vocab size and special token ids of a tokenizer folder (its config.json when it has one,
    else the tokenizer itself)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    info = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    cfg_path = os.path.join(tok_dir, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg)
        for key in info:
            if cfg.get(key) is not None:
                info[key] = cfg[key]
    gen_path = os.path.join(tok_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if gen.get(key) is not None:
                info[key] = gen[key]
    if info["pad_token_id"] is None:  # transformers' generate needs one; any non-EOS id does
        info["pad_token_id"] = 0
    return info


def text_config(args, tok: dict) -> dict:
    L = args.layers
    step = args.interleave_moe_layer_step
    return dict(
        vocab_size=tok["vocab_size"], hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,            # per routed expert and the shared expert
        intermediate_size_mlp=args.intermediate_size_mlp,    # dense layers (when interleaved)
        num_hidden_layers=L, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        num_local_experts=args.experts, num_experts_per_tok=1,
        interleave_moe_layer_step=step, moe_layers=list(range(step - 1, L, step)),
        no_rope_layers=[int((i + 1) % 4 != 0) for i in range(L)],   # NoPE (global) every 4th layer
        attention_chunk_size=args.attention_chunk_size,
        use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
        # llama3 scaling as Scout's (factor 16 over 8192 positions); Scout has low == high == 1, which
        # transformers warns about on every load, so high is 4 here (no effect on speed)
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
        max_position_embeddings=args.max_position_embeddings, rms_norm_eps=1e-5,
        tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"], pad_token_id=tok["pad_token_id"],
    )


def build(args) -> str:
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    tok_dir = args.tokenizer or default_tokenizer_dir()
    tok = tokenizer_info(tok_dir)
    cfg = Llama4TextConfig(**text_config(args, tok))
    print(f"building Llama4ForCausalLM: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_local_experts} experts top-1 + shared on layers {cfg.moe_layers}, vocab {cfg.vocab_size}, "
          f"chunk {cfg.attention_chunk_size}, NoPE layers {[i for i, r in enumerate(cfg.no_rope_layers) if not r]}",
          flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = Llama4ForCausalLM(cfg)
    # transformers' init (std 0.02) makes this small model repeat one token and route unevenly;
    # ~1/sqrt(hidden) gives varied greedy outputs and tokens spread over all experts
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * args.init_std)
    model = model.to(getattr(torch, args.dtype)).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"  {n / 1e6:.1f}M parameters ({args.dtype}), initialised in {time.perf_counter() - t0:.1f} s", flush=True)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = os.path.join(tok_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(out, name))
    with open(os.path.join(out, "herd_benchmark_model.json"), "w") as f:
        json.dump({"builder": "benchmarks/build_moe_checkpoint.py", "seed": args.seed, "tokenizer": tok_dir,
                   "parameters": n, "args": vars(args)}, f, indent=2)
    return out


def check(path: str):
    """Both loaders accept the folder: herd's config parser and transformers' config + weights."""
    from herd.model.config import Llama4TextConfig as HerdConfig
    from transformers import AutoConfig

    h = HerdConfig.from_pretrained(path)
    t = AutoConfig.from_pretrained(path)
    assert h.moe_layers == list(t.moe_layers) and h.no_rope_layers == list(t.no_rope_layers), "config mismatch"
    assert h.attention_chunk_size == t.attention_chunk_size and h.vocab_size == t.vocab_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out", help="folder to write (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored weight dtype")
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--intermediate-size", type=int, default=1024, help="routed and shared expert width")
    ap.add_argument("--intermediate-size-mlp", type=int, default=2048, help="dense FFN width (interleaved layers)")
    ap.add_argument("--interleave-moe-layer-step", type=int, default=1,
                    help="1: every layer MoE (Scout); 2: odd layers MoE, even dense (Maverick)")
    ap.add_argument("--attention-chunk-size", type=int, default=128)
    ap.add_argument("--max-position-embeddings", type=int, default=32768)
    ap.add_argument("--init-std", type=float, default=0.05, help="std of the random weights (norms stay 1)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder to copy (default: herd/assets/default)")
    args = ap.parse_args(argv)
    if args.hidden_size % args.heads or args.heads % args.kv_heads:
        ap.error("--hidden-size must divide by --heads, and --heads by --kv-heads")
    path = build(args)
    check(path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
