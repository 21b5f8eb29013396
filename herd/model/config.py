"""Llama 4 text-model configuration parsed from a Hugging Face config.json.

Kept independent of transformers' config classes so the planner and loader can read any
checkpoint (full Llama4ForConditionalGeneration or bare llama4_text) without importing them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Llama4TextConfig:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192
    intermediate_size_mlp: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: list[int] = field(default_factory=list)
    no_rope_layers: list[int] = field(default_factory=list)  # 1 = RoPE + chunked, 0 = NoPE
    attention_chunk_size: int | None = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Rotation pairs of RoPE: Llama 4 rotates (2i, 2i+1) ("interleaved"); HF Llama 1-3 checkpoints
    # rotate (i, i + d/2) ("neox", transformers' rotate_half).
    rope_style: str = "interleaved"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # Set when the checkpoint is a Llama4ForConditionalGeneration (weights under language_model.)
    multimodal: bool = False
    architecture: str = "Llama4ForCausalLM"
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return i in self._moe_set

    def is_rope_layer(self, i: int) -> bool:
        return bool(self.no_rope_layers[i])

    def __post_init__(self):
        L = self.num_hidden_layers
        if not self.no_rope_layers:
            self.no_rope_layers = [int((i + 1) % 4 != 0) for i in range(L)]
        if len(self.no_rope_layers) != L:
            raise ValueError(f"no_rope_layers has {len(self.no_rope_layers)} entries, expected {L}")
        self._moe_set = frozenset(self.moe_layers)
        if any(i < 0 or i >= L for i in self._moe_set):
            raise ValueError(f"moe_layers {self.moe_layers} out of range for {L} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_style not in ("interleaved", "neox"):
            raise ValueError(f"rope_style must be 'interleaved' or 'neox', got {self.rope_style!r}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "Llama4TextConfig":
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") == "llama" or "LlamaForCausalLM" in archs:
            return cls.from_llama_dict(cfg)
        multimodal = "text_config" in cfg
        text = dict(cfg["text_config"]) if multimodal else dict(cfg)
        L = int(text.get("num_hidden_layers", 48))
        step = int(text.get("interleave_moe_layer_step", 1))
        moe_layers = text.get("moe_layers")
        if moe_layers is None:
            moe_layers = list(range(step - 1, L, step)) if step > 0 else []
        interval = int(text.get("no_rope_layer_interval", 4))
        no_rope = text.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(L)]
        hidden = int(text.get("hidden_size", 5120))
        heads = int(text.get("num_attention_heads", 40))
        rope_params = text.get("rope_parameters") or {}
        rope_scaling = text.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        eos = text.get("eos_token_id", cfg.get("eos_token_id"))
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        tuning = text.get("attn_temperature_tuning", True)
        return cls(
            vocab_size=int(text.get("vocab_size", 202048)),
            hidden_size=hidden,
            intermediate_size=int(text.get("intermediate_size", 8192)),
            intermediate_size_mlp=int(text.get("intermediate_size_mlp", 16384)),
            num_hidden_layers=L,
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads", 8)),
            head_dim=int(text.get("head_dim") or hidden // heads),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            num_local_experts=int(text.get("num_local_experts", 16)),
            num_experts_per_tok=int(text.get("num_experts_per_tok", 1)),
            moe_layers=[int(i) for i in moe_layers],
            no_rope_layers=[int(x) for x in no_rope],
            attention_chunk_size=text.get("attention_chunk_size", 8192),
            use_qk_norm=bool(text.get("use_qk_norm", True)),
            attn_temperature_tuning=bool(tuning),
            floor_scale=float(text.get("floor_scale", 8192)),
            attn_scale=float(text.get("attn_scale", 0.1)),
            rope_theta=float(text.get("rope_theta", rope_params.get("rope_theta", 500000.0))),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
            hidden_act=text.get("hidden_act", "silu"),
            bos_token_id=text.get("bos_token_id", cfg.get("bos_token_id")),
            eos_token_id=eos,
            pad_token_id=text.get("pad_token_id", cfg.get("pad_token_id")),
            torch_dtype=str(text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
            multimodal=multimodal or "Llama4ForConditionalGeneration" in archs,
            architecture=archs[0] if archs else ("Llama4ForConditionalGeneration" if multimodal else "Llama4ForCausalLM"),
            raw=cfg,
        )

    @classmethod
    def from_llama_dict(cls, cfg: dict[str, Any]) -> "Llama4TextConfig":
        """A dense HF Llama (1-3) config as a Llama 4 decoder with no MoE layers: every layer RoPE
        with global attention, no QK-norm, no temperature tuning, rotate-half RoPE pairs."""
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ValueError(f"Llama checkpoints with {key}=true are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (silu only)")
        if cfg.get("pretraining_tp", 1) not in (None, 1):
            raise ValueError("Llama checkpoints with pretraining_tp > 1 are not supported")
        L = int(cfg["num_hidden_layers"])
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope_params = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        inter = int(cfg["intermediate_size"])
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        return cls(
            vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, intermediate_size=inter,
            intermediate_size_mlp=inter, num_hidden_layers=L, num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            num_local_experts=0, num_experts_per_tok=0, moe_layers=[], no_rope_layers=[1] * L,
            attention_chunk_size=None, use_qk_norm=False, attn_temperature_tuning=False,
            rope_theta=float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
            rope_scaling=rope_scaling, rope_style="neox",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos, pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            multimodal=False, architecture=archs[0], raw=cfg,
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "Llama4TextConfig":
        path = os.fspath(path)
        cfg_path = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json found at {cfg_path}")
        with open(cfg_path) as f:
            return cls.from_dict(json.load(f))
