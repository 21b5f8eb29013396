from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.attention.backends.abstract import AttentionBackend
from herd.attention.backends.triton.kernels import (default_num_splits, paged_attention, paged_decode,
                                                    reshape_and_cache)


@dataclass
class TritonPlan:
    num_decodes: int
    decode_splits: int
    prefill_qsl: torch.Tensor | None   # [Bp+1] query_start_loc of the prefills, rows from num_decodes
    prefill_seq_lens: torch.Tensor | None
    prefill_tables: torch.Tensor | None
    max_query_len: int
    max_seq_len: int


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_graphs = True
    supports_cuda_graphs = True   # decode reads only device tensors; splits fixed when captured

    def __init__(self, graph_splits: int = 8):
        self.graph_splits = graph_splits

    def build(self, common, chunks, for_graph=False):
        nd, B = common.num_decodes, common.num_reqs
        plans = {}
        for g, gm in common.groups.items():
            chunk = chunks[g]
            splits = (self.graph_splits if for_graph
                      else default_num_splits(common.max_seq_len, chunk, max(nd, 1), 8))
            pq = ps = pt = None
            if nd < B:
                pq = common.query_start_loc[nd:] - common.query_start_loc[nd]
                ps, pt = common.seq_lens[nd:], gm.block_tables[nd:]
            plans[g] = TritonPlan(nd, splits, pq, ps, pt, common.max_query_len, common.max_seq_len)
        return plans

    def forward(self, layer, q, k, v, positions, meta):
        k_cache, v_cache, k_scale, v_scale = self.layer_cache(layer, meta)
        gm = meta.common.groups[layer.group]
        reshape_and_cache(k, v, k_cache, v_cache, gm.slot_mapping, k_scale, v_scale)
        p: TritonPlan = meta.per_group[layer.group]
        out = torch.empty_like(q)
        nd = p.num_decodes
        if nd:
            paged_decode(q[:nd], k_cache, v_cache, gm.block_tables[:nd], meta.common.seq_lens[:nd],
                         max_seq_len=p.max_seq_len, chunk=layer.chunk, scale=layer.scale, k_scale=k_scale,
                         v_scale=v_scale, num_splits=p.decode_splits, out=out[:nd])
        if p.prefill_qsl is not None:
            paged_attention(q[nd:], k_cache, v_cache, p.prefill_tables, p.prefill_qsl, p.prefill_seq_lens,
                            max_query_len=p.max_query_len, max_seq_len=p.max_seq_len, chunk=layer.chunk,
                            scale=layer.scale, k_scale=k_scale, v_scale=v_scale, out=out[nd:])
        return out
