from __future__ import annotations

from herd.attention.backends.abstract import AttentionBackend
from herd.ops.attention import paged_attention_ref


class ReferenceAttentionBackend(AttentionBackend):
    name = "reference"

    def build(self, common, chunks, for_graph=False):
        # host lists, read by the loop over sequences
        host = {"query_start_loc": common.query_start_loc_cpu.tolist(), "seq_lens": common.seq_lens_cpu.tolist()}
        return {g: host for g in common.groups}

    def forward(self, layer, q, k, v, positions, meta):
        k_cache, v_cache, k_scale, v_scale = self.layer_cache(layer, meta)
        host = meta.per_group[layer.group]
        gm = meta.common.groups[layer.group]
        return paged_attention_ref(q, k, v, positions, host["query_start_loc"], host["seq_lens"],
                                   gm.block_tables, gm.slot_mapping, k_cache, v_cache, meta.block_size,
                                   layer.chunk, layer.scale, k_scale, v_scale, layer.layer_idx)
