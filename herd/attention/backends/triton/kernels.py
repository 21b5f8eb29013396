"""Triton kernels for paged attention over Llama 4's two kinds of layers.

KV cache per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], in the model
dtype or float8_e4m3fn (per-tensor scales: stored = clamp(x / scale, +-448), read = fp8 * scale).
Chunked-local RoPE layers: a query at position p sees keys [(p // chunk) * chunk, p].
Global NoPE layers (chunk=None): keys [0, p].
Block tables [B, W] (int32 or int64) hold -1 for unallocated and freed blocks. Freed blocks are
local-layer blocks entirely left of a query's chunk. They are never read: the key loops start at
the window's first key, and any key whose table entry is -1 is masked out of the loads as well, so
a freed physical block may already hold another sequence's data, or garbage.

Three entry points, all asynchronous (no host reads of device values; every size the launch grid
needs arrives as a host int):
  reshape_and_cache  write this step's K/V rows into their cache slots (quantizing for fp8)
  paged_attention    varlen batch of prefill chunks and decodes, flash-attention style
  paged_decode       one query per sequence, split-K ("flash decoding") plus a reduce kernel

The torch reference these must match is herd/ops/attention.py.

Layout choices worth knowing:
* GQA: a program owns one KV head and packs (query, head-in-group) pairs into the rows of its tile,
  so K/V are loaded once for every query head that reads them. Row m of a tile is query
  m // G and head kv_head * G + m % G, with G = H // Hkv (G need not be a power of two:
  Llama 4 Scout has G = 5; the tile is padded to a power of two).
* Keys are scanned in BLOCK_N tiles independent of the cache block size: each key's physical
  block is looked up in the block table, so block_size 16 and 128 run the same tile shapes.
* Softmax runs in base 2 (exp2) with sm_scale * log2(e) folded into one multiplier. For fp8
  caches the K scale is folded into that multiplier and the V scale into the final output, so the
  fp8 values are only widened (exact), never multiplied element by element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from herd.ops.triton import interpreting
from herd.ops.triton.fp8_quant import round_to_e4m3_grid

_FP8_DTYPES = (torch.float8_e4m3fn,)
_LOG2E = 1.4426950408889634

_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}



def _dot_dtype(dtype: torch.dtype):
    """The operand dtype for tl.dot: the model dtype, except bf16 under the Triton CPU interpreter,
    whose bf16 dot is wrong (fp16/fp32 are exact there)."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    if dtype not in _TORCH_TO_TL:
        raise TypeError(f"unsupported attention dtype {dtype}")
    return _TORCH_TO_TL[dtype]


def _scale_args(scale, fallback: torch.Tensor):
    """A KV scale as kernel arguments (pointer, value, read-from-pointer flag). A tensor is read on
    the device (no host sync); a python float is passed by value. `fallback` fills the unused
    pointer slot and is never dereferenced."""
    if isinstance(scale, torch.Tensor):
        return scale, 1.0, True
    return fallback, float(scale), False


@triton.jit
def _load_scale(ptr, value, FROM_PTR: tl.constexpr):
    if FROM_PTR:
        value = tl.load(ptr).to(tl.float32)
    return value


# --------------------------------------------------------------------------------------------
# reshape_and_cache
# --------------------------------------------------------------------------------------------

@triton.jit
def _reshape_and_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr, k_scale_val, v_scale_val,
    num_kv_heads, head_dim,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_FP8: tl.constexpr, K_SCALE_PTR: tl.constexpr, V_SCALE_PTR: tl.constexpr,
    SOFT_FP8_ROUND: tl.constexpr,
):
    """One program per token: copy its [Hkv, d] K and V rows into the slot it maps to."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # slot < 0: padding or a token this KV group doesn't keep -> store nothing. (slot is broadcast
    # before the compare: a scalar bool & a tensor comes out int32 under the Triton interpreter)
    slot_ok = (tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot) >= 0
    mask = slot_ok & (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)

    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    if IS_FP8:
        k_scale = _load_scale(k_scale_ptr, k_scale_val, K_SCALE_PTR)
        v_scale = _load_scale(v_scale_ptr, v_scale_val, V_SCALE_PTR)
        # div_rn: correctly rounded division, like torch's (a plain `/` may lower to an approximate
        # divide on NVIDIA GPUs and flip the fp8 rounding of a few values)
        k = tl.minimum(tl.maximum(tl.math.div_rn(k.to(tl.float32), k_scale), -448.0), 448.0)
        v = tl.minimum(tl.maximum(tl.math.div_rn(v.to(tl.float32), v_scale), -448.0), 448.0)
        if SOFT_FP8_ROUND:
            k = round_to_e4m3_grid(k)
            v = round_to_e4m3_grid(v)

    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :] * stride_kcd
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale=1.0, v_scale=1.0) -> None:
    """k, v [T, Hkv, d] -> cache slots slot_mapping [T] (block * block_size + offset; < 0 = skip).
    fp8 caches store clamp(x / scale, +-448); k_scale/v_scale: python floats or 1-element tensors."""
    T, nkv, d = k.shape
    if T == 0:
        return
    block_size = k_cache.shape[1]
    is_fp8 = k_cache.dtype in _FP8_DTYPES
    ks_ptr, ks_val, ks_from_ptr = _scale_args(k_scale, slot_mapping)
    vs_ptr, vs_val, vs_from_ptr = _scale_args(v_scale, slot_mapping)
    _reshape_and_cache_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        ks_ptr, vs_ptr, ks_val, vs_val,
        nkv, d,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_SIZE=block_size, BLOCK_H=triton.next_power_of_2(nkv), BLOCK_D=triton.next_power_of_2(d),
        IS_FP8=is_fp8, K_SCALE_PTR=ks_from_ptr, V_SCALE_PTR=vs_from_ptr,
        SOFT_FP8_ROUND=is_fp8 and interpreting(),
        num_warps=4 if nkv * d >= 1024 else 1,
    )


# --------------------------------------------------------------------------------------------
# the shared inner loop: online softmax over a range of paged keys
# --------------------------------------------------------------------------------------------

@triton.jit
def _attend_keys(
    q, m_i, l_i, acc,
    q_pos, win_lo,                       # [BLOCK_M] each row's position and first visible key
    k_lo, k_hi,                          # scalars: the key range [k_lo, k_hi) this program scans
    bt_ptr, bt_width, stride_btw,        # this sequence's block-table row, its length W, its stride
    k_cache_ptr, v_cache_ptr, kv_head, head_dim,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    qk_scale,                            # sm_scale * log2(e) (* k_scale for fp8 caches)
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Fold keys [k_lo, k_hi) into the running (max m_i, sum l_i, acc) of the tile's rows.
    m_i is in log2 units. A key is loaded only if it is in range and its block is allocated; it
    counts for a row only if it is causal for the row and inside the row's window."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_head = kv_head.to(tl.int64)
    for start in range(k_lo, k_hi, BLOCK_N):
        k_pos = start + offs_n
        in_range = (k_pos >= k_lo) & (k_pos < k_hi)
        logical = k_pos // BLOCK_SIZE
        phys = tl.load(bt_ptr + logical * stride_btw, mask=in_range & (logical < bt_width), other=-1).to(tl.int64)
        kv_ok = in_range & (phys >= 0)
        # never form an address through a -1 entry, even a masked one
        phys = tl.where(kv_ok, phys, 0)
        slot = (k_pos % BLOCK_SIZE).to(tl.int64)

        # K loaded directly transposed: [BLOCK_D, BLOCK_N]
        k_ptrs = (k_cache_ptr + phys[None, :] * stride_kcb + slot[None, :] * stride_kcs
                  + kv_head * stride_kch + offs_d[:, None] * stride_kcd)
        k = tl.load(k_ptrs, mask=d_ok[:, None] & kv_ok[None, :], other=0.0).to(DOT_DTYPE)
        # input_precision only matters for fp32 operands: exact fp32 rather than TF32 there;
        # fp16/bf16 operands use the tensor cores either way, accumulating in fp32
        s = tl.dot(q, k, input_precision="ieee") * qk_scale          # [BLOCK_M, BLOCK_N], fp32

        visible = (kv_ok[None, :] & (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= win_lo[:, None]))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - (-inf)) never makes a NaN (its p and alpha are then exactly 0)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v_ptrs = (v_cache_ptr + phys[:, None] * stride_vcb + slot[:, None] * stride_vcs
                  + kv_head * stride_vch + offs_d[None, :] * stride_vcd)
        v = tl.load(v_ptrs, mask=kv_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        m_i = m_new
    return m_i, l_i, acc


# --------------------------------------------------------------------------------------------
# paged_attention: varlen prefill chunks + decodes
# --------------------------------------------------------------------------------------------

@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, qsl_ptr, seq_lens_ptr,
    k_scale_ptr, v_scale_ptr, k_scale_val, v_scale_val,
    sm_scale_log2, chunk, head_dim, bt_width,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_btb, stride_btw,
    G: tl.constexpr,                     # query heads per KV head
    BLOCK_Q: tl.constexpr,               # queries per tile (BLOCK_Q * G <= BLOCK_M)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    IS_CHUNKED: tl.constexpr, IS_FP8: tl.constexpr, K_SCALE_PTR: tl.constexpr, V_SCALE_PTR: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """grid (B, cdiv(max_query_len, BLOCK_Q), Hkv): queries [tile*BLOCK_Q, +BLOCK_Q) of sequence b,
    all G query heads of one KV head."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if tile * BLOCK_Q >= q_len:          # past this sequence's queries (also: q_len == 0)
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first_q_pos = seq_len - q_len        # position of the sequence's first query this step

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = tile * BLOCK_Q + offs_m // G
    head = kv_head * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (q_idx < q_len)
    q_pos = first_q_pos + q_idx
    if IS_CHUNKED:
        win_lo = (q_pos // chunk) * chunk
    else:
        win_lo = tl.zeros([BLOCK_M], dtype=tl.int32)

    # The tile's key range: from its first query's window start (earlier keys are invisible to
    # every row; on chunked layers their blocks may be freed) to its last query's position.
    tile_first = first_q_pos + tile * BLOCK_Q
    tile_last = tl.minimum(first_q_pos + q_len, tile_first + BLOCK_Q) - 1
    if IS_CHUNKED:
        k_lo = (tile_first // chunk) * chunk
    else:
        k_lo = 0
    k_hi = tile_last + 1

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    tok = (q_start + q_idx).to(tl.int64)
    q_ptrs = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)

    qk_scale = sm_scale_log2
    if IS_FP8:
        qk_scale = qk_scale * _load_scale(k_scale_ptr, k_scale_val, K_SCALE_PTR)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i, l_i, acc = _attend_keys(
        q, m_i, l_i, acc, q_pos, win_lo, k_lo, k_hi,
        bt_ptr + b.to(tl.int64) * stride_btb, bt_width, stride_btw,
        k_cache_ptr, v_cache_ptr, kv_head, head_dim,
        stride_kcb, stride_kcs, stride_kch, stride_kcd,
        stride_vcb, stride_vcs, stride_vch, stride_vcd,
        qk_scale, BLOCK_SIZE, BLOCK_N, BLOCK_D, DOT_DTYPE,
    )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if IS_FP8:
        out = out * _load_scale(v_scale_ptr, v_scale_val, V_SCALE_PTR)
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check_shapes(q, k_cache, v_cache):
    H, d = q.shape[-2], q.shape[-1]
    nkv = k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must have the same shape and dtype")
    if k_cache.shape[3] != d or H % nkv:
        raise ValueError(f"q heads {H} x {d} do not fit a cache with {nkv} KV heads x {k_cache.shape[3]}")
    return H, nkv, d, H // nkv


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, *,
                    max_query_len: int, max_seq_len: int, chunk: int | None, scale: float,
                    k_scale=1.0, v_scale=1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, d] -> out [T, H, d]. Sequence b owns rows query_start_loc[b]:query_start_loc[b+1]
    at positions seq_lens[b] - q_len_b ... seq_lens[b] - 1; its K/V (cached context and this step's
    tokens) are already in the cache. Causal, and chunk-local when `chunk` is set.
    max_query_len bounds the grid (it must be >= every q_len); max_seq_len is accepted for a
    uniform interface (the key loop bounds are per sequence, on the device)."""
    H, nkv, d, G = _check_shapes(q, k_cache, v_cache)
    if out is None:
        out = torch.empty_like(q)
    B = seq_lens.shape[0]
    if q.shape[0] == 0 or B == 0 or max_query_len <= 0:
        return out

    # Rows per tile: enough for the longest query run times the group, padded to a power of two;
    # at least 16 (tl.dot's minimum) and at most 128 unless one query's heads need more.
    block_m = min(128, triton.next_power_of_2(max_query_len * G))
    block_m = max(16, block_m, triton.next_power_of_2(G))
    block_q = block_m // G
    block_n = 64 if d <= 128 else 32
    num_warps = 8 if block_m >= 128 and d >= 128 else 4

    is_fp8 = k_cache.dtype in _FP8_DTYPES
    ks_ptr, ks_val, ks_from_ptr = _scale_args(k_scale, seq_lens)
    vs_ptr, vs_val, vs_from_ptr = _scale_args(v_scale, seq_lens)
    grid = (B, triton.cdiv(max_query_len, block_q), nkv)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        ks_ptr, vs_ptr, ks_val, vs_val,
        scale * _LOG2E, chunk or 0, d, block_tables.shape[1],
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        G=G, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_SIZE=k_cache.shape[1], IS_CHUNKED=chunk is not None, IS_FP8=is_fp8,
        K_SCALE_PTR=ks_from_ptr, V_SCALE_PTR=vs_from_ptr, DOT_DTYPE=_dot_dtype(q.dtype),
        num_warps=num_warps, num_stages=2,
    )
    return out


# --------------------------------------------------------------------------------------------
# paged_decode: split-K flash decoding
# --------------------------------------------------------------------------------------------

@triton.jit
def _paged_decode_split_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, seq_lens_ptr,
    k_scale_ptr, v_scale_ptr, k_scale_val, v_scale_val,
    sm_scale_log2, chunk, head_dim, bt_width, num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_ob, stride_oh, stride_od,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_btb, stride_btw,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, IS_CHUNKED: tl.constexpr, IS_FP8: tl.constexpr,
    K_SCALE_PTR: tl.constexpr, V_SCALE_PTR: tl.constexpr, DOT_DTYPE: tl.constexpr,
    WRITE_OUT: tl.constexpr,             # num_splits == 1: normalise and write out, no reduce pass
):
    """grid (B, Hkv, num_splits): split `split` of sequence b's visible keys, for the G query heads
    of one KV head. Writes the partial (max, sum, unnormalised acc) of every head."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    q_pos = tl.maximum(seq_len - 1, 0)   # seq_len 0 (a padded batch slot) scans nothing
    if IS_CHUNKED:
        lo = (q_pos // chunk) * chunk
    else:
        lo = 0
    # Split the window [lo, seq_len) evenly, each part a whole number of key tiles.
    span = seq_len - lo
    per_split = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    s_lo = lo + split * per_split
    s_hi = tl.minimum(s_lo + per_split, seq_len)

    offs_m = tl.arange(0, BLOCK_M)
    head = kv_head * G + offs_m
    row_ok = offs_m < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    bb = b.to(tl.int64)
    q_ptrs = q_ptr + bb * stride_qb + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)

    qk_scale = sm_scale_log2
    if IS_FP8:
        qk_scale = qk_scale * _load_scale(k_scale_ptr, k_scale_val, K_SCALE_PTR)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i, l_i, acc = _attend_keys(
        q, m_i, l_i, acc,
        tl.zeros([BLOCK_M], dtype=tl.int32) + q_pos, tl.zeros([BLOCK_M], dtype=tl.int32) + lo,
        s_lo, s_hi,
        bt_ptr + bb * stride_btb, bt_width, stride_btw,
        k_cache_ptr, v_cache_ptr, kv_head, head_dim,
        stride_kcb, stride_kcs, stride_kch, stride_kcd,
        stride_vcb, stride_vcs, stride_vch, stride_vcd,
        qk_scale, BLOCK_SIZE, BLOCK_N, BLOCK_D, DOT_DTYPE,
    )
    if IS_FP8:
        acc = acc * _load_scale(v_scale_ptr, v_scale_val, V_SCALE_PTR)

    if WRITE_OUT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + bb * stride_ob + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # partials are contiguous fp32: m, l [B, H, S]; acc [B, H, S, BLOCK_D]
        row = (bb * (tl.num_programs(1) * G) + head) * num_splits + split
        tl.store(part_m_ptr + row, m_i, mask=row_ok)
        tl.store(part_l_ptr + row, l_i, mask=row_ok)
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _paged_decode_reduce_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    num_heads, num_splits, head_dim,
    stride_ob, stride_oh, stride_od,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grid (B, H): merge one head's split partials: out = sum_s w_s acc_s / sum_s w_s l_s with
    w_s = 2^(m_s - max_s m_s). Empty splits (m = -inf) weigh 0."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    row = (b * num_heads + h) * num_splits + offs_s
    m = tl.load(part_m_ptr + row, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(w * l, 0)
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


def default_num_splits(max_seq_len: int, chunk: int | None, num_seqs: int, num_kv_heads: int) -> int:
    """Split the visible window (at most `chunk` keys on chunked layers) into parts of >= 256 keys,
    only as far as needed to give the GPU ~256 programs, at most 32 parts."""
    window = max_seq_len if chunk is None else min(max_seq_len, chunk)
    by_length = triton.cdiv(max(window, 1), 256)
    by_occupancy = triton.cdiv(256, max(1, num_seqs * num_kv_heads))
    return max(1, min(by_length, by_occupancy, 32))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, *, max_seq_len: int, chunk: int | None, scale: float,
                 k_scale=1.0, v_scale=1.0, num_splits: int | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, d], one query per sequence at position seq_lens[b] - 1 -> out [B, H, d].
    The visible keys are split into num_splits parts attended in parallel, then merged."""
    H, nkv, d, G = _check_shapes(q, k_cache, v_cache)
    B = q.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(max_seq_len, chunk, B, nkv)
    num_splits = max(1, int(num_splits))

    block_m = max(16, triton.next_power_of_2(G))
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 64 if d <= 128 else 32
    is_fp8 = k_cache.dtype in _FP8_DTYPES
    ks_ptr, ks_val, ks_from_ptr = _scale_args(k_scale, seq_lens)
    vs_ptr, vs_val, vs_from_ptr = _scale_args(v_scale, seq_lens)
    write_out = num_splits == 1
    if write_out:
        part_m = part_l = part_acc = out        # unused
    else:
        part_m = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B, H, num_splits, block_d), dtype=torch.float32, device=q.device)

    _paged_decode_split_kernel[(B, nkv, num_splits)](
        out, part_m, part_l, part_acc,
        q, k_cache, v_cache, block_tables, seq_lens,
        ks_ptr, vs_ptr, ks_val, vs_val,
        scale * _LOG2E, chunk or 0, d, block_tables.shape[1], num_splits,
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        G=G, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_SIZE=k_cache.shape[1],
        IS_CHUNKED=chunk is not None, IS_FP8=is_fp8, K_SCALE_PTR=ks_from_ptr, V_SCALE_PTR=vs_from_ptr,
        DOT_DTYPE=_dot_dtype(q.dtype), WRITE_OUT=write_out,
        num_warps=4, num_stages=2,
    )
    if not write_out:
        _paged_decode_reduce_kernel[(B, H)](
            out, part_m, part_l, part_acc, H, num_splits, d, *out.stride(),
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
            num_warps=1 if block_d <= 64 else 2,
        )
    return out


__all__ = ["reshape_and_cache", "paged_attention", "paged_decode", "default_num_splits"]
