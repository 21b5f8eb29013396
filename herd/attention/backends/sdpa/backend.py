from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from herd.attention.backends.abstract import AttentionBackend
from herd.attention.metadata import next_pow2
from herd.ops.attention import FP8_KV_DTYPES, attention_mask, quantize_kv
from herd.ops.cpu import cpu_paged_decode_supported


@dataclass
class DecodePlan:
    """One batched SDPA over some decode rows, their windows padded to the widest of them."""
    rows: torch.Tensor | None  # [b] which decode rows (None: all of them, in order)
    phys: torch.Tensor      # [b, W] physical block ids of each decode's visible window (0 where padded)
    mask: torch.Tensor      # [b, 1, 1, W * block_size] visible keys


@dataclass
class PrefillPlan:
    start: int              # query rows start:end
    end: int
    block_ids: torch.Tensor  # [n] blocks from the first visible one
    num_tokens: int         # keys in those blocks that exist (context from the first visible block)
    mask: torch.Tensor      # [qlen, num_tokens]


@dataclass
class GroupPlan:
    decodes: list[DecodePlan]   # buckets covering every decode row once (empty without decodes)
    prefills: list[PrefillPlan]


# A bucket of its own must save at least this many padded keys (summed over its rows) to pay for
# one more SDPA call per layer and its row gather / scatter.
BUCKET_MIN_SAVING_TOKENS = 2048


def decode_buckets(widths: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Rows of the decode batch (`widths`: visible blocks of each) grouped so that each group's
    padded width (its widest row) costs little more than its rows' own widths: rows by power-of-two
    width class, then neighbouring classes merged (narrowest first) while splitting them would save
    fewer than BUCKET_MIN_SAVING_TOKENS padded keys. Equal widths give one bucket."""
    order = np.argsort(widths, kind="stable")
    cls = np.array([next_pow2(int(w)) for w in widths[order]])
    groups = [order[cls == c] for c in np.unique(cls)]
    merged = [groups[0]]
    for g in groups[1:]:
        cur = merged[-1]
        w_cur, w_all = int(widths[cur].max()), int(widths[g].max())
        saving = len(cur) * (w_all - w_cur)   # padding the narrower rows up to the wider bucket's width
        if saving * block_size < BUCKET_MIN_SAVING_TOKENS:
            merged[-1] = np.concatenate([cur, g])
        else:
            merged.append(g)
    return merged


def _store(k, v, k_cache, v_cache, slots, k_scale, v_scale):
    """Every slot is valid here (the runner points padding rows at its scratch block)."""
    nkv, d = k_cache.shape[-2], k_cache.shape[-1]
    if k_cache.dtype in FP8_KV_DTYPES:
        # index_copy_ has no fp8 kernel on every device: copy the bytes
        k = quantize_kv(k, k_scale, k_cache.dtype).view(torch.uint8)
        v = quantize_kv(v, v_scale, v_cache.dtype).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, nkv, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, nkv, d).index_copy_(0, slots, v.to(v_cache.dtype))


def _dequant(kv, dtype, scale):
    return (kv.float() * scale).to(dtype) if kv.dtype in FP8_KV_DTYPES else kv


class SdpaAttentionBackend(AttentionBackend):
    name = "sdpa"
    supports_graphs = True   # torch.compile on CPU; decode windows are bucketed to powers of two

    def build(self, common, chunks, for_graph=False):
        return {g: self._plan(common, gm, chunks[g], for_graph) for g, gm in common.groups.items()}

    def _plan(self, common, gm, chunk, for_graph) -> GroupPlan:
        bs, nd = common.block_size, common.num_decodes
        tables = gm.block_tables
        decodes = []
        if nd:
            sl = common.seq_lens_cpu[:nd].astype(np.int64)
            start_blk = (((sl - 1) // chunk) * chunk) // bs if chunk is not None else np.zeros_like(sl)
            widths = (sl - 1) // bs + 1 - start_blk
            # captured graphs need one static shape: a single bucket, its width a power of two
            buckets = [None] if for_graph else decode_buckets(widths, bs)
            if len(buckets) == 1:
                buckets = [None]   # every row, in order
            for rows in buckets:
                width = int(widths.max() if rows is None else widths[rows].max())
                if for_graph:  # >= 2: a width of 1 would be compiled as a constant (0/1 specialization)
                    width = max(2, next_pow2(width))
                decodes.append(self._decode_plan(common, tables, chunk, width, rows))
        prefills = []
        qsl, sls = common.query_start_loc_cpu, common.seq_lens_cpu
        for b in range(nd, common.num_reqs):
            s, e, seq_len = int(qsl[b]), int(qsl[b + 1]), int(sls[b])
            if e == s:
                continue
            first_pos = seq_len - (e - s)
            start_block = 0 if chunk is None else ((first_pos // chunk) * chunk) // bs
            n_blocks = -(-seq_len // bs)
            dev = tables.device
            q_pos = torch.arange(first_pos, seq_len, device=dev)
            k_pos = torch.arange(start_block * bs, seq_len, device=dev)
            prefills.append(PrefillPlan(s, e, tables[b, start_block:n_blocks].long(), seq_len - start_block * bs,
                                        attention_mask(q_pos, k_pos, chunk)))
        return GroupPlan(decodes, prefills)

    def mark_window_dynamic(self, plan: GroupPlan) -> None:
        for d in plan.decodes:   # widths of at least 2 (build's for_graph), so not 0/1-specialized
            torch._dynamo.maybe_mark_dynamic(d.phys, 1)
            torch._dynamo.maybe_mark_dynamic(d.mask, 3)

    @staticmethod
    def _decode_plan(common, tables, chunk, width, rows) -> DecodePlan:
        bs, nd = common.block_size, common.num_decodes
        dev = tables.device
        idx = None if rows is None else torch.as_tensor(rows, dtype=torch.long).to(dev)
        seq_lens = common.seq_lens[:nd].long()
        table = tables[:nd]
        if idx is not None:
            seq_lens, table = seq_lens[idx], table[idx]
        q_pos = seq_lens - 1
        start_tok = (q_pos // chunk) * chunk if chunk is not None else torch.zeros_like(q_pos)
        first = start_tok // bs
        blk = first[:, None] + torch.arange(width, device=dev)[None, :]
        n_blk = q_pos // bs + 1
        phys = table.long().gather(1, blk.clamp(max=tables.shape[1] - 1))
        # Padding and freed (-1) entries are never attended; point them at block 0 for the gather.
        phys = torch.where((blk < n_blk[:, None]) & (phys >= 0), phys, 0)
        k_pos = first[:, None] * bs + torch.arange(width * bs, device=dev)[None, :]
        mask = (k_pos <= q_pos[:, None]) & (k_pos >= start_tok[:, None])
        return DecodePlan(idx, phys, mask[:, None, None, :])

    def forward(self, layer, q, k, v, positions, meta):
        k_cache, v_cache, k_scale, v_scale = self.layer_cache(layer, meta)
        _store(k, v, k_cache, v_cache, meta.common.groups[layer.group].slot_mapping, k_scale, v_scale)
        plan: GroupPlan = meta.per_group[layer.group]
        gqa = layer.num_heads != layer.num_kv_heads  # module constants: a plain bool under tracing
        if len(plan.decodes) == 1 and plan.decodes[0].rows is None and not plan.prefills:
            d = plan.decodes[0]
            if d.phys.shape[0] == q.shape[0]:
                return self._decode(layer, q, k_cache, v_cache, k_scale, v_scale, d, gqa)
        out = torch.empty_like(q)
        nd = sum(d.phys.shape[0] for d in plan.decodes)
        for d in plan.decodes:
            o = self._decode(layer, q[:nd] if d.rows is None else q[d.rows], k_cache, v_cache, k_scale, v_scale,
                             d, gqa)
            if d.rows is None:
                out[:nd] = o
            else:
                out.index_copy_(0, d.rows, o)
        for p in plan.prefills:
            kb = _dequant(k_cache[p.block_ids].flatten(0, 1)[:p.num_tokens], q.dtype, k_scale)
            vb = _dequant(v_cache[p.block_ids].flatten(0, 1)[:p.num_tokens], q.dtype, v_scale)
            o = F.scaled_dot_product_attention(q[p.start:p.end].transpose(0, 1), kb.transpose(0, 1),
                                               vb.transpose(0, 1), attn_mask=p.mask, scale=layer.scale,
                                               enable_gqa=gqa)
            out[p.start:p.end] = o.transpose(0, 1)
        return out

    @staticmethod
    def _decode(layer, q, k_cache, v_cache, k_scale, v_scale, d: DecodePlan, gqa: bool):
        if cpu_paged_decode_supported(q, k_cache):  # reads the window in place, no gathered copy
            return torch.ops.herd.cpu_paged_decode(q, k_cache, v_cache, d.phys, d.mask, layer.scale)
        kb = _dequant(k_cache[d.phys], q.dtype, k_scale).flatten(1, 2)   # [b, W*bs, Hkv, hd]
        vb = _dequant(v_cache[d.phys], q.dtype, v_scale).flatten(1, 2)
        return F.scaled_dot_product_attention(q[:, :, None, :], kb.transpose(1, 2), vb.transpose(1, 2),
                                              attn_mask=d.mask, scale=layer.scale, enable_gqa=gqa)[:, :, 0, :]
