#!/usr/bin/env python3
"""Build Llama 4 MoE checkpoints (Llama4ForCausalLM) from SmolLM2's real weights, to test the MoE
paths on non-random weights.

Two constructions, from the first --layers decoder layers of SmolLM2-135M-Instruct:

  exact     Every layer is MoE and computes exactly SmolLM2's dense MLP. The MLP's intermediate
            channels are split in two halves: the shared expert holds the first half; every routed
            expert holds the second half. The router has 2m rows c*v, -c*v for m unit directions v
            (normalised rows of the layer's real gate_proj) with c large, so top-1 picks the
            expert of the largest |v.x| with its sign (tokens spread over all experts) and the
            sigmoid of the chosen logit is exactly 1: shared + routed = dense MLP for any routing.
            The model's logits equal SmolLM2's (truncated to the same layers).
  distinct  Odd layers MoE, even layers dense (Maverick's interleave). Expert e holds intermediate
            channels chunk e of the real MLP, the shared expert chunk 0, the router is the
            normalised gate rows times a moderate scale (unsaturated sigmoid): a real-weight
            checkpoint whose output depends on every routing decision, for parity with
            transformers' Llama4ForCausalLM.

Attention weights are SmolLM2's, with q/k rows moved to Llama 4's interleaved RoPE pairs; every
layer uses RoPE (no NoPE layers), no QK-norm, attention_chunk_size 8192.

    python scripts/build_real_moe.py --out build/smollm2-moe [--mode exact] [--layers 4] [--experts 8]
        [--dense-out build/smollm2-dense4]   # the truncated dense Llama (the reference of --mode exact)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

ROUTER_SCALE = {"exact": 1e4, "distinct": 4.0}


def smollm2_folder() -> str:
    """The converted HF folder of the installed SmolLM2 GGUF."""
    from herd.config import gguf_cache_dir
    from herd.gguf.convert import gguf_to_hf
    from herd.hub.smollm2 import INSTALL_HINT, find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        raise SystemExit(f"SmolLM2 is not installed: {INSTALL_HINT}")
    return gguf_to_hf(path, gguf_cache_dir())


def _load(src: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from herd.model.loader import iterate_checkpoint

    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    return cfg, dict(iterate_checkpoint(src, desc="Reading SmolLM2"))


def _copy_tokenizer(src: str, out: str):
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "chat_template", "generation_config", "special_tokens")):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))


def _interleave_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> Llama 4's interleaved pairs (llama.cpp's layout)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, -1).transpose(1, 2).reshape(w.shape)


def build_dense(src: str, out: str, layers: int) -> str:
    """The first `layers` layers of the source Llama as a plain HF Llama checkpoint."""
    cfg, sd = _load(src)
    keep = {k: v for k, v in sd.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in keep.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**cfg, "num_hidden_layers": layers}, f, indent=2)
    _copy_tokenizer(src, out)
    return out


def build_moe(src: str, out: str, layers: int = 4, experts: int = 8, mode: str = "exact") -> str:
    if mode not in ROUTER_SCALE:
        raise ValueError(f"mode must be one of {list(ROUTER_SCALE)}")
    cfg, sd = _load(src)
    D, I, H, Hkv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if mode == "exact" and experts % 2:
        raise ValueError("--mode exact needs an even number of experts (router rows come in +v / -v pairs)")
    inter = I // 2 if mode == "exact" else I // experts
    moe_layers = list(range(layers)) if mode == "exact" else list(range(1, layers, 2))
    tensors = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"],
               "model.norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        tensors["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        for leaf in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight"):
            tensors[q + leaf] = sd[p + leaf]
        tensors[q + "self_attn.q_proj.weight"] = _interleave_rows(sd[p + "self_attn.q_proj.weight"], H)
        tensors[q + "self_attn.k_proj.weight"] = _interleave_rows(sd[p + "self_attn.k_proj.weight"], Hkv)
        gate, up, down = (sd[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        ff = q + "feed_forward."
        if i not in moe_layers:
            for n, w in (("gate", gate), ("up", up), ("down", down)):
                tensors[ff + f"{n}_proj.weight"] = w
            continue
        if mode == "exact":
            shared = slice(0, inter)
            routed = [slice(inter, 2 * inter)] * experts
            dirs = gate[: experts // 2].float()
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
            router = torch.cat([dirs, -dirs]) * ROUTER_SCALE[mode]
        else:
            shared = slice(0, inter)
            routed = [slice(e * inter, (e + 1) * inter) for e in range(experts)]
            rows = gate[torch.linspace(0, I - 1, experts).long()].float()
            router = rows / rows.norm(dim=1, keepdim=True) * ROUTER_SCALE[mode]
        for n, w in (("gate", gate[shared]), ("up", up[shared]), ("down", down[:, shared])):
            tensors[ff + f"shared_expert.{n}_proj.weight"] = w
        tensors[ff + "router.weight"] = router.to(gate.dtype)
        # HF Llama 4 stores experts fused and transposed: gate_up [E, D, 2I], down [E, I, D]
        tensors[ff + "experts.gate_up_proj"] = torch.stack([torch.cat([gate[s].t(), up[s].t()], dim=1) for s in routed])
        tensors[ff + "experts.down_proj"] = torch.stack([down[:, s].t() for s in routed])
    text = {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "vocab_size": cfg["vocab_size"], "hidden_size": D, "intermediate_size": inter, "intermediate_size_mlp": I,
        "num_hidden_layers": layers, "num_attention_heads": H, "num_key_value_heads": Hkv,
        "head_dim": cfg.get("head_dim") or D // H, "rms_norm_eps": cfg["rms_norm_eps"],
        "num_local_experts": experts, "num_experts_per_tok": 1, "moe_layers": moe_layers,
        "interleave_moe_layer_step": 1 if mode == "exact" else 2,
        "no_rope_layers": [1] * layers, "attention_chunk_size": 8192, "use_qk_norm": False,
        "attn_temperature_tuning": False, "floor_scale": 8192, "attn_scale": 0.1,
        "rope_theta": cfg["rope_theta"], "rope_scaling": None,
        "max_position_embeddings": cfg["max_position_embeddings"],
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False), "hidden_act": "silu",
        "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"), "torch_dtype": cfg.get("torch_dtype", "bfloat16"),
        "herd_real_moe": {"source": os.path.abspath(src), "mode": mode},
    }
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(text, f, indent=2)
    _copy_tokenizer(src, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--source", default=None, help="HF Llama folder (default: the installed SmolLM2)")
    parser.add_argument("--mode", choices=list(ROUTER_SCALE), default="exact")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dense-out", default=None, help="also write the truncated dense reference here")
    args = parser.parse_args(argv)
    src = args.source or smollm2_folder()
    print(build_moe(src, args.out, args.layers, args.experts, args.mode))
    if args.dense_out:
        print(build_dense(src, args.dense_out, args.layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
