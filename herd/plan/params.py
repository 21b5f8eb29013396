"""Exact parameter counts and weight bytes of a Llama 4 checkpoint, from its config alone.

The checkpoint is described as a list of `WeightGroup`s (same-shaped matrices, e.g. all q_proj
weights). Counts, bytes per precision, per-device shards and bytes read per decode step are all
sums over that list, so every figure the planner prints comes from the same description.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Any

from herd.model.config import Llama4TextConfig

CATEGORIES = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts",
              "router", "norms", "lm_head", "vision", "projector")
WEIGHT_DTYPES = ("bf16", "fp8", "int4")
# The FP8-dynamic recipe (spec/fp8.md part B) quantizes only the MLP/expert Linears; these module
# names stay BF16. Embeddings and norms are not Linear layers, so no recipe touches them.
BF16_UNDER_QUANT = ("lm_head", "self_attn", "router", "vision_model", "multi_modal_projector")
QUANTIZED_CATEGORIES = frozenset({"routed_experts", "shared_experts", "dense_mlp"})
INT4_GROUP_SIZE = 128  # W4A16 with one BF16 scale per 128 input channels, symmetric (no zero point)


@dataclass(frozen=True)
class VisionConfig:
    """The `vision_config` of a Llama4ForConditionalGeneration (defaults: HF class defaults)."""
    hidden_size: int = 768
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    intermediate_size: int = 5632
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 7680

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        names = cls.__dataclass_fields__
        return cls(**{k: int(v) for k, v in d.items() if k in names and v is not None})


@dataclass(frozen=True)
class WeightGroup:
    name: str                 # checkpoint-style module name, e.g. "self_attn.q_proj"
    category: str             # one of CATEGORIES
    rows: int                 # output features (vectors: their length)
    cols: int                 # input features (vectors: 1)
    count: int                # matrices of this shape in the checkpoint
    active_count: int         # of those, how many one text token uses
    tp_ways: int | None = None  # most ways tensor parallelism splits it; None = any, 1 = replicated

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.count

    @property
    def active_numel(self) -> int:
        return self.rows * self.cols * self.active_count

    def quantized(self, dtype: str) -> bool:
        return dtype != "bf16" and self.category in QUANTIZED_CATEGORIES

    def bytes(self, dtype: str) -> int:
        """Bytes of all `count` matrices stored in `dtype` (weights plus their scales)."""
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
        if not self.quantized(dtype):
            return 2 * self.numel
        if dtype == "fp8":  # E4M3 weight + one BF16 scale per output channel
            return self.numel + 2 * self.rows * self.count
        groups = ceil(self.cols / INT4_GROUP_SIZE)
        return ceil(self.numel / 2) + 2 * self.rows * groups * self.count

    def shards(self, tp: int) -> int:
        return tp if self.tp_ways is None else max(1, min(tp, self.tp_ways))


def text_weight_groups(c: Llama4TextConfig) -> list[WeightGroup]:
    D, L, d, V = c.hidden_size, c.num_hidden_layers, c.head_dim, c.vocab_size
    I, Im, E, k = c.intermediate_size, c.intermediate_size_mlp, c.num_local_experts, c.num_experts_per_tok
    M = sum(1 for i in range(L) if c.is_moe_layer(i))
    nq, nkv = c.num_attention_heads * d, c.num_key_value_heads * d
    W = WeightGroup
    groups = [
        W("embed_tokens", "embedding", V, D, 1, 1),
        W("self_attn.q_proj", "attention", nq, D, L, L),
        # K/V heads split across ranks only up to num_key_value_heads; beyond that they replicate
        W("self_attn.k_proj", "attention", nkv, D, L, L, c.num_key_value_heads),
        W("self_attn.v_proj", "attention", nkv, D, L, L, c.num_key_value_heads),
        W("self_attn.o_proj", "attention", D, nq, L, L),
        W("input_layernorm+post_attention_layernorm", "norms", D, 1, 2 * L, 2 * L, 1),
        W("norm", "norms", D, 1, 1, 1, 1),
    ]
    if M:
        groups += [
            W("feed_forward.router", "router", E, D, M, M, 1),
            # fused gate+up; one token runs top-k of the E experts
            W("feed_forward.experts.gate_up_proj", "routed_experts", 2 * I, D, M * E, M * k),
            W("feed_forward.experts.down_proj", "routed_experts", D, I, M * E, M * k),
            W("feed_forward.shared_expert.gate_proj+up_proj", "shared_experts", I, D, 2 * M, 2 * M),
            W("feed_forward.shared_expert.down_proj", "shared_experts", D, I, M, M),
        ]
    if L - M:
        groups += [
            W("feed_forward.gate_proj+up_proj", "dense_mlp", Im, D, 2 * (L - M), 2 * (L - M)),
            W("feed_forward.down_proj", "dense_mlp", D, Im, L - M, L - M),
        ]
    if not c.tie_word_embeddings:
        groups.append(W("lm_head", "lm_head", V, D, 1, 1))
    return groups


def vision_weight_groups(v: VisionConfig, text_hidden: int) -> list[WeightGroup]:
    H, Iv, Lv = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    grid = v.image_size // v.patch_size
    W = WeightGroup
    return [
        W("vision_model.patch_embedding", "vision", H, v.num_channels * v.patch_size ** 2, 1, 0),
        W("vision_model.class_embedding", "vision", H, 1, 1, 0, 1),
        W("vision_model.positional_embedding_vlm", "vision", grid * grid + 1, H, 1, 0, 1),
        W("vision_model.layernorm_pre+post (weight, bias)", "vision", H, 1, 4, 0, 1),
        W("vision_model.layers.self_attn.{q,k,v,o}_proj", "vision", H, H, 4 * Lv, 0),
        W("vision_model.layers.self_attn biases", "vision", H, 1, 4 * Lv, 0, 1),
        W("vision_model.layers.mlp.fc1", "vision", Iv, H, Lv, 0),
        W("vision_model.layers.mlp.fc1 bias", "vision", Iv, 1, Lv, 0, 1),
        W("vision_model.layers.mlp.fc2", "vision", H, Iv, Lv, 0),
        W("vision_model.layers.mlp.fc2 bias", "vision", H, 1, Lv, 0, 1),
        W("vision_model.layers.{input,post_attention}_layernorm", "vision", H, 1, 4 * Lv, 0, 1),
        W("vision_model.vision_adapter.mlp.fc1", "vision", v.projector_input_dim, Iv, 1, 0),
        # HF builds fc2 as projector_output_dim -> projector_output_dim (equal widths in practice)
        W("vision_model.vision_adapter.mlp.fc2", "vision", v.projector_output_dim,
          v.projector_output_dim, 1, 0),
        W("multi_modal_projector.linear_1", "projector", text_hidden, v.vision_output_dim, 1, 0),
    ]


def weight_groups(text: Llama4TextConfig, vision: VisionConfig | None) -> list[WeightGroup]:
    groups = text_weight_groups(text)
    if vision is not None:
        groups += vision_weight_groups(vision, text.hidden_size)
    return groups


@dataclass(frozen=True)
class ParamCounts:
    total: dict[str, int]   # category -> parameters in the checkpoint
    active: dict[str, int]  # category -> parameters one text token uses (embedding row counted in full)

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        return sum(self.active.values())

    @property
    def active_params_no_embedding(self) -> int:
        return self.active_params - self.active["embedding"]


def count_params(groups: list[WeightGroup]) -> ParamCounts:
    total = dict.fromkeys(CATEGORIES, 0)
    active = dict.fromkeys(CATEGORIES, 0)
    for g in groups:
        total[g.category] += g.numel
        active[g.category] += g.active_numel
    return ParamCounts(total, active)


def weight_bytes(groups: list[WeightGroup], dtype: str) -> dict[str, int]:
    """Checkpoint bytes per category when stored in `dtype`."""
    out = dict.fromkeys(CATEGORIES, 0)
    for g in groups:
        out[g.category] += g.bytes(dtype)
    return out


def weight_bytes_per_device(groups: list[WeightGroup], dtype: str, tp: int) -> int:
    """Bytes of weights each of `tp` ranks holds (sharded groups split, the rest replicated)."""
    return sum(ceil(g.bytes(dtype) / g.shards(tp)) for g in groups)


def experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts a batch of `tokens` routes to, with uniform routing."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def bytes_read_per_device(groups: list[WeightGroup], dtype: str, tp: int, tokens: int,
                          num_experts: int, top_k: int) -> float:
    """Weight bytes one rank reads from HBM for a forward step over `tokens` text tokens.

    Routed experts are read only when some token picks them; an embedding row is read per token;
    the vision tower does not run for text tokens.
    """
    total = 0.0
    for g in groups:
        per_device = g.bytes(dtype) / g.shards(tp)
        if g.category == "routed_experts":
            total += per_device * experts_touched(num_experts, top_k, tokens) / num_experts
        elif g.category == "embedding":
            total += per_device * min(tokens, g.rows) / g.rows
        elif g.category not in ("vision", "projector"):
            total += per_device
    return total
