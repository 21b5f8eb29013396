"""Llama 4 text decoder: iRoPE attention (chunked RoPE layers + global NoPE layers), MoE and dense FFNs.

A pure function of (token ids, positions, attention metadata); the metadata carries the paged KV
cache views. With `attn_metadata=None` the input is one sequence attended without a cache.
Module names follow vLLM (qkv_proj, gate_up_proj, experts) so quantization files line up.
"""
from __future__ import annotations

import torch
from torch import nn

from herd.model.config import Llama4TextConfig
from herd.model.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                               ReplicatedLinear, RMSNorm, RotaryEmbedding, RowParallelLinear,
                               VocabParallelEmbedding)
from herd.attention.metadata import AttentionMetadata
from herd.ops.attention import contiguous_attention_ref
from herd.ops.moe import fused_moe, silu_and_mul
from herd.parallel.context import SINGLE, TPContext


class QuantMethods:
    """Default factory: no quantization. herd.quant provides FP8 factories with the same methods."""

    def linear(self, prefix: str):
        return None

    def moe(self, prefix: str):
        return None

    def post_load(self, model):
        """Called once the weights are loaded, on the CPU, before the model moves to its device."""

    def finish(self):
        """Called at shutdown (INC MEASURE writes its files here)."""
        return []


class Attention(nn.Module):
    """The attention op itself (named like vLLM's `self_attn.attn`): KV store + paged attention, run by
    the backend the runner chose (`meta.impl`)."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 chunk: int | None):
        super().__init__()
        self.layer_idx, self.chunk = layer_idx, chunk
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.group = "local" if chunk is not None else "full"

    def forward(self, q, k, v, positions, meta: AttentionMetadata | None):
        if meta is None or meta.kv_caches is None:
            return contiguous_attention_ref(q, k, v, positions, self.chunk, self.scale)
        return meta.impl.forward(self, q, k, v, positions, meta)


class Llama4Attention(nn.Module):
    def __init__(self, cfg: Llama4TextConfig, layer_idx: int, dtype, tp: TPContext, quant: QuantMethods,
                 prefix: str):
        super().__init__()
        self.use_rope = cfg.is_rope_layer(layer_idx)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, dtype, tp, quant.linear(f"{prefix}.qkv_proj"))
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, dtype, tp,
                                        quant.linear(f"{prefix}.o_proj"))
        nh, nkv, d = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = nh * d, nkv * d
        self.rotary_emb = (RotaryEmbedding(d, cfg.rope_theta, cfg.rope_scaling, cfg.rope_style)
                           if self.use_rope else None)
        self.qk_norm = RMSNorm(d, cfg.rms_norm_eps, has_weight=False) if self.use_rope and cfg.use_qk_norm else None
        self.temperature_tuning = (not self.use_rope) and cfg.attn_temperature_tuning
        self.floor_scale, self.attn_scale = cfg.floor_scale, cfg.attn_scale
        chunk = cfg.attention_chunk_size if self.use_rope else None
        self.attn = Attention(layer_idx, nh, nkv, d, chunk)

    def forward(self, positions, x, meta):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, -1, self.attn.head_dim)
        k = k.view(T, -1, self.attn.head_dim)
        v = v.view(T, -1, self.attn.head_dim)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
            if self.qk_norm is not None:  # after RoPE, RoPE layers only
                q, k = self.qk_norm(q), self.qk_norm(k)
        elif self.temperature_tuning:
            tau = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * tau[:, None, None]).to(q.dtype)
        o = self.attn(q, k, v, positions, meta)
        return self.o_proj(o.reshape(T, -1))


class Llama4MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype, tp: TPContext, quant: QuantMethods, prefix: str,
                 reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], dtype, tp,
                                                       quant.linear(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(inter, hidden, dtype, tp, quant.linear(f"{prefix}.down_proj"),
                                           reduce_results=reduce_results)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class UnquantizedFusedMoEMethod:
    use_reference = False   # True: the per-expert reference loop (tests)
    def create_weights(self, layer: "FusedMoE", dtype):
        E, D, I = layer.num_local_experts, layer.hidden_size, layer.inter_local
        layer.w13_weight = nn.Parameter(torch.empty(E, 2 * I, D, dtype=dtype), requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.empty(E, D, I, dtype=dtype), requires_grad=False)

    def process_weights_after_loading(self, layer):
        pass

    def apply(self, layer: "FusedMoE", x, topk_ids, topk_weights):
        # grouped fast path (falls back to fused_moe_ref itself when _grouped_mm cannot run)
        return fused_moe(x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
                         apply_router_weight_on_input=True, expert_map=layer.expert_map,
                         use_reference=self.use_reference)


class FusedMoE(nn.Module):
    """Routed experts. TP shards each expert's intermediate dim; EP gives each rank whole experts.
    Returns this rank's partial sum (the caller all-reduces once for routed + shared)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype, tp: TPContext,
                 expert_parallel: bool = False, quant_method=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.tp, self.ep = num_experts, hidden, tp, expert_parallel
        if expert_parallel:
            self.num_local_experts = tp.shard(num_experts, "num_local_experts")
            self.inter_local = inter
            first = tp.rank * self.num_local_experts
            emap = torch.full((num_experts,), -1, dtype=torch.long)
            emap[first:first + self.num_local_experts] = torch.arange(self.num_local_experts)
            self.register_buffer("expert_map", emap, persistent=False)
        else:
            self.num_local_experts, self.inter_local = num_experts, tp.shard(inter, "intermediate_size")
            self.expert_map = None
        self.quant_method = quant_method or UnquantizedFusedMoEMethod()
        self.quant_method.create_weights(self, dtype)

    def local_expert(self, e: int) -> int | None:
        if not self.ep:
            return e
        local = e - self.tp.rank * self.num_local_experts
        return local if 0 <= local < self.num_local_experts else None

    def weight_loader(self, param, loaded: torch.Tensor, shard_id: str, expert_id: int):
        """loaded is one expert's [out, in] matrix: w1 (gate), w3 (up) or w2 (down)."""
        e = self.local_expert(expert_id)
        if e is None:
            return
        I = self.inter_local
        r = 0 if self.ep else self.tp.rank
        if shard_id in ("w1", "w3"):
            dst = param[e].narrow(0, 0 if shard_id == "w1" else I, I)
            src = loaded.narrow(0, r * I, I)
        elif shard_id == "w2":  # per-output-channel scales [D, 1] are not split along I
            dst, src = param[e], loaded if loaded.shape[-1] == 1 else loaded.narrow(1, r * I, I)
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")
        if dst.shape != src.shape:
            raise ValueError(f"expert {expert_id} {shard_id}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
        dst.copy_(src.to(dst.dtype))

    def forward(self, x, topk_ids, topk_weights):
        return self.quant_method.apply(self, x, topk_ids, topk_weights)


class Llama4MoE(nn.Module):
    def __init__(self, cfg: Llama4TextConfig, dtype, tp: TPContext, quant: QuantMethods, prefix: str,
                 expert_parallel: bool = False):
        super().__init__()
        self.top_k, self.tp = cfg.num_experts_per_tok, tp
        self.router = ReplicatedLinear(cfg.hidden_size, cfg.num_local_experts, dtype, tp,
                                       quant.linear(f"{prefix}.router"))
        self.experts = FusedMoE(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, dtype, tp,
                                expert_parallel, quant.moe(f"{prefix}.experts"))
        self.shared_expert = Llama4MLP(cfg.hidden_size, cfg.intermediate_size, dtype, tp, quant,
                                       f"{prefix}.shared_expert", reduce_results=False)

    def forward(self, x):
        logits = self.router(x)
        top_val, top_idx = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top_val.float()).to(x.dtype)  # sigmoid of the chosen logit; no renorm
        out = self.shared_expert(x) + self.experts(x, top_idx, scores)
        return self.tp.all_reduce(out)


class Llama4DecoderLayer(nn.Module):
    def __init__(self, cfg, i, dtype, tp, quant, prefix, expert_parallel=False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Llama4Attention(cfg, i, dtype, tp, quant, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if cfg.is_moe_layer(i):
            self.feed_forward = Llama4MoE(cfg, dtype, tp, quant, f"{prefix}.feed_forward", expert_parallel)
        else:
            self.feed_forward = Llama4MLP(cfg.hidden_size, cfg.intermediate_size_mlp, dtype, tp, quant,
                                          f"{prefix}.feed_forward")

    def forward(self, positions, h, meta):
        h = h + self.self_attn(positions, self.input_layernorm(h), meta)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class Llama4Model(nn.Module):
    def __init__(self, cfg, dtype, tp, quant, prefix="model", expert_parallel=False):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        self.layers = nn.ModuleList(
            Llama4DecoderLayer(cfg, i, dtype, tp, quant, f"{prefix}.layers.{i}", expert_parallel)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def forward(self, input_ids, positions, meta, inputs_embeds=None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            h = layer(positions, h, meta)
        return self.norm(h)


class Llama4ForCausalLM(nn.Module):
    def __init__(self, cfg: Llama4TextConfig, dtype=torch.bfloat16, tp: TPContext = SINGLE,
                 quant: QuantMethods | None = None, expert_parallel: bool = False):
        super().__init__()
        self.config, self.dtype, self.tp = cfg, dtype, tp
        quant = quant or QuantMethods()
        self.model = Llama4Model(cfg, dtype, tp, quant, "model", expert_parallel)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def get_input_embeddings(self, input_ids):
        return self.model.embed_tokens(input_ids)
