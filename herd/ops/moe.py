"""Grouped expert GEMMs. Reference: sort (token, expert) pairs by expert, one GEMM pair per expert.

Weights: w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]. Llama 4 applies the router weight
to the expert *input* (before the SwiGLU), so it cannot be folded into the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, apply_router_weight_on_input: bool = True,
                  expert_map: torch.Tensor | None = None, linear=None) -> torch.Tensor:
    """x [T, D]; topk_ids/topk_weights [T, k]. expert_map maps global expert id -> local index or -1
    (expert parallelism: experts owned by other ranks contribute nothing here).
    `linear(x, e, which)` overrides the per-expert GEMM (quantized weights)."""
    T, k = topk_ids.shape
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1)
    if expert_map is not None:
        flat_ids = expert_map[flat_ids]
    token_idx = torch.arange(T, device=x.device).repeat_interleave(k)
    weights = topk_weights.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    counts = torch.bincount(sorted_ids[sorted_ids >= 0], minlength=w13.shape[0]).tolist()
    start = int((sorted_ids < 0).sum())
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok = token_idx[sel]
        xin = x[tok]
        w = weights[sel].to(x.dtype)[:, None]
        if apply_router_weight_on_input:
            xin = xin * w
        if linear is None:
            h = silu_and_mul(F.linear(xin, w13[e]))
            y = F.linear(h, w2[e])
        else:
            y = linear(silu_and_mul(linear(xin, e, "w13")), e, "w2")
        if not apply_router_weight_on_input:
            y = y * w
        out.index_add_(0, tok, y)
    return out
