"""Paged attention: the readable torch reference (the `reference` attention backend runs it; the
faster backends in herd.attention are tested against it) over block tables, with chunk-local masks and fp8 KV.

KV cache per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim].
Two KV groups exist: "full" (NoPE / global layers keep every block) and "local" (chunked-attention
RoPE layers; blocks left of the current attention chunk are freed and marked -1 in the table).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_KV_DTYPES = (torch.float8_e4m3fn,)


def quantize_kv(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """clamp(x / scale, +-448) as fp8, the quotient correctly rounded on every device. On CUDA
    torch divides by a Python (or CPU) scalar as a multiply by its reciprocal, which rounds some
    ties the other way (bf16 0.75 / 0.015 is 50.0 exactly, 0.75 * (1 / 0.015) 50.000004: e4m3 48
    vs 52); a scale on x's device divides, as the CPU and the Triton cache kernel do."""
    x = x.float()
    if not isinstance(scale, torch.Tensor) or scale.device != x.device:
        scale = x.new_full((), float(scale))
    return (x / scale).clamp(-448, 448).to(dtype)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk]: causal, and on chunked layers only keys in the query's chunk."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if chunk is not None:
        mask &= (k_pos[None, :] // chunk) == (q_pos[:, None] // chunk)
    return mask


def sdpa(q, k, v, mask, scale):
    """q [Tq, H, d], k/v [Tk, Hkv, d] -> [Tq, H, d]; GQA by repeat-interleave (head j -> kv j // g)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    """Write new K/V rows into their slots (quantizing for fp8 caches)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    nkv, d = k_cache.shape[-2], k_cache.shape[-1]
    kc, vc = k_cache.view(-1, nkv, d), v_cache.view(-1, nkv, d)
    kk, vv = k[keep], v[keep]
    if k_cache.dtype in FP8_KV_DTYPES:
        kk, vv = quantize_kv(kk, k_scale, k_cache.dtype), quantize_kv(vv, v_scale, v_cache.dtype)
    kc[slots] = kk.to(k_cache.dtype)
    vc[slots] = vv.to(v_cache.dtype)


def gather_kv(cache, block_ids, n_tokens, dtype, scale=1.0):
    """block_ids [n] -> [n_tokens, Hkv, d]; with n_tokens None, block_ids [B, W] -> [B, W, bs, Hkv, d]."""
    kv = cache[block_ids] if n_tokens is None else cache[block_ids].flatten(0, 1)[:n_tokens]
    if cache.dtype in FP8_KV_DTYPES:
        return (kv.float() * scale).to(dtype)
    return kv


def paged_attention_ref(q, k, v, positions, query_start_loc: list[int], seq_lens: list[int],
                        block_tables: torch.Tensor, slot_mapping: torch.Tensor, k_cache, v_cache,
                        block_size: int, chunk: int | None, scale: float, k_scale=1.0, v_scale=1.0,
                        layer_idx: int = 0) -> torch.Tensor:
    """Store this step's K/V, then attend each sequence's queries over its cached context.
    Sequence b owns rows query_start_loc[b]:query_start_loc[b+1] (host lists); single-query
    sequences (decodes) are attended together in one batched call."""
    store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    bs = block_size
    out = torch.empty_like(q)
    decodes = []
    for b in range(len(seq_lens)):
        s, e = query_start_loc[b], query_start_loc[b + 1]
        if e - s == 1:
            decodes.append(b)
            continue
        if e == s:
            continue
        seq_len = seq_lens[b]
        q_pos = positions[s:e]
        # Keys before the first query's chunk are never visible (and their blocks may be freed).
        first = int(q_pos[0]) if chunk is None else (int(q_pos[0]) // chunk) * chunk
        start_block = 0 if chunk is None else first // bs
        n_blocks = (seq_len + bs - 1) // bs
        block_ids = block_tables[b, start_block:n_blocks]
        if bool((block_ids < 0).any()):
            raise RuntimeError(f"sequence {b}: KV block needed by layer {layer_idx} was freed")
        n_tok = seq_len - start_block * bs
        kb = gather_kv(k_cache, block_ids, n_tok, q.dtype, k_scale)
        vb = gather_kv(v_cache, block_ids, n_tok, q.dtype, v_scale)
        k_pos = torch.arange(start_block * bs, seq_len, device=q.device)
        out[s:e] = sdpa(q[s:e], kb, vb, attention_mask(q_pos, k_pos, chunk), scale)
    if decodes:
        rows = [query_start_loc[b] for b in decodes]
        out[rows] = decode_attention_ref(q[rows], positions[rows], block_tables[decodes], k_cache, v_cache,
                                         bs, chunk, scale, k_scale, v_scale, layer_idx)
    return out


def decode_attention_ref(q, q_pos, block_tables, k_cache, v_cache, bs, chunk, scale, k_scale=1.0, v_scale=1.0,
                         layer_idx=0) -> torch.Tensor:
    """One query per sequence (q [B, H, d] at positions q_pos [B]): gather every sequence's visible
    blocks into one padded [B, L] window and attend in a single batched call."""
    B = q.shape[0]
    start_tok = (q_pos // chunk) * chunk if chunk is not None else torch.zeros_like(q_pos)
    start_blk = start_tok // bs
    n_blk = q_pos // bs + 1
    width = int((n_blk - start_blk).max())
    blk = start_blk[:, None] + torch.arange(width, device=q.device)[None, :]
    valid = blk < n_blk[:, None]
    phys = block_tables.gather(1, blk.clamp(max=block_tables.shape[1] - 1))
    if bool((valid & (phys < 0)).any()):
        raise RuntimeError(f"a KV block needed by layer {layer_idx} was freed")
    phys = torch.where(valid, phys, 0)
    kb = gather_kv(k_cache, phys, None, q.dtype, k_scale).flatten(1, 2)   # [B, W*bs, Hkv, d]
    vb = gather_kv(v_cache, phys, None, q.dtype, v_scale).flatten(1, 2)
    k_pos = start_blk[:, None] * bs + torch.arange(width * bs, device=q.device)[None, :]
    mask = (k_pos <= q_pos[:, None]) & (k_pos >= start_tok[:, None])      # [B, L]
    # enable_gqa: query head j reads kv head j // group without materialising repeated K/V
    o = F.scaled_dot_product_attention(q[:, :, None, :], kb.transpose(1, 2), vb.transpose(1, 2),
                                       attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=q.shape[1] != kb.shape[2])
    return o[:, :, 0, :]


def contiguous_attention_ref(q, k, v, positions, chunk: int | None, scale: float) -> torch.Tensor:
    """One sequence, no cache: every token attends within the sequence itself."""
    return sdpa(q, k, v, attention_mask(positions, positions, chunk), scale)
