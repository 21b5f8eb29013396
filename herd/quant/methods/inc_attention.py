"""INC MEASURE statistics of the attention op, as vLLM-HPU's attention impl records them.

vLLM-HPU (HPUAttentionImpl) runs attention through patched modules: `k_cache` / `v_cache` (the new
K / V written), `matmul_qk` (inputs: query * scale, keys), `softmax` (input: the logits, output:
the probabilities) and `matmul_av` (inputs: probabilities, values). herd's backends fuse these, so
the observer recomputes them explicitly after the layer ran, over the keys each query attends to
(the paged cache, chunk-local masks included). Decode steps in vLLM-HPU multiply unnormalised block
softmax values exp(s - block max), whose maximum is exactly 1, into matmul_av: decode rows record
1.0 there, prefill rows the normalised probabilities. Query rows are processed in chunks to bound
memory (calibration only).
"""
from __future__ import annotations

import torch

from herd.ops.attention import attention_mask, gather_kv

_Q_CHUNK = 256


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)


def _context(layer, k, v, positions, meta, b: int, s: int):
    """Keys, values and their positions visible to the queries of sequence b (first row s)."""
    if meta is None or meta.kv_caches is None:
        return k, v, positions
    k_cache, v_cache, k_scale, v_scale = meta.impl.layer_cache(layer, meta)
    seq_len = int(meta.common.seq_lens_cpu[b])
    bs = meta.block_size
    start_block = 0 if layer.chunk is None else (int(positions[s]) // layer.chunk) * layer.chunk // bs
    n_blocks = (seq_len + bs - 1) // bs
    block_ids = meta.common.groups[layer.group].block_tables[b, start_block:n_blocks].long()
    n_tok = seq_len - start_block * bs
    kb = gather_kv(k_cache, block_ids, n_tok, k.dtype, k_scale)
    vb = gather_kv(v_cache, block_ids, n_tok, v.dtype, v_scale)
    return kb, vb, torch.arange(start_block * bs, seq_len, device=k.device)


def attention_stats(layer, q, k, v, positions, meta) -> dict[str, torch.Tensor]:
    """{"q": amax(q * scale), "k", "v": amax of the visible keys / values, "logits" / "probs": amax
    of the unmasked logits / the softmax output of prefill rows, "av": amax of what matmul_av gets
    as its first input (see the module docstring)} over the whole step."""
    zero = torch.zeros((), device=q.device)
    out = {name: zero for name in ("q", "k", "v", "logits", "probs")}
    paged = meta is not None and meta.kv_caches is not None
    qsl = meta.common.query_start_loc_cpu if paged else [0, q.shape[0]]
    group = q.shape[1] // k.shape[1]
    any_decode = False
    for b in range(len(qsl) - 1):
        s, e = int(qsl[b]), int(qsl[b + 1])
        if e == s:
            continue
        kb, vb, k_pos = _context(layer, k, v, positions, meta, b, s)
        out["k"] = torch.maximum(out["k"], _amax(kb))
        out["v"] = torch.maximum(out["v"], _amax(vb))
        out["q"] = torch.maximum(out["q"], _amax(q[s:e].float() * layer.scale))
        if paged and e - s == 1:   # vLLM-HPU decodes skip the softmax module (flat paged attention)
            any_decode = True
            continue
        kh = kb.float().repeat_interleave(group, dim=1).transpose(0, 1)    # [H, Tk, d]
        for c in range(s, e, _Q_CHUNK):
            rows = slice(c, min(e, c + _Q_CHUNK))
            qs = q[rows].float() * layer.scale                               # [Tq, H, d]
            logits = torch.matmul(qs.transpose(0, 1), kh.transpose(1, 2))    # [H, Tq, Tk]
            mask = attention_mask(positions[rows], k_pos, layer.chunk).expand_as(logits)
            probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
            out["logits"] = torch.maximum(out["logits"], _amax(logits[mask]))
            out["probs"] = torch.maximum(out["probs"], _amax(probs))
    out["av"] = torch.maximum(out["probs"], torch.ones_like(zero)) if any_decode else out["probs"]
    return out


def attention_observer(collector, impl: str):
    """Forward hook for herd's Attention op; `impl` is the INC name of vLLM's `self_attn.attn.impl`."""
    def hook(module, args, _output):
        q, k, v, positions, meta = args[:5]
        collector.observe(impl + ".k_cache", "inputs", 0, k)
        collector.observe(impl + ".v_cache", "inputs", 0, v)
        if not any(collector.wants(f"{impl}.{op}", "inputs") for op in ("matmul_qk", "softmax", "matmul_av")):
            return
        st = attention_stats(module, q, k, v, positions, meta)
        for node, kind, index, key in (("matmul_qk", "inputs", 0, "q"), ("matmul_qk", "inputs", 1, "k"),
                                       ("softmax", "inputs", 0, "logits"), ("softmax", "outputs", 0, "probs"),
                                       ("matmul_av", "inputs", 0, "av"), ("matmul_av", "inputs", 1, "v")):
            if collector.wants(f"{impl}.{node}", kind):
                collector.observe_amax(f"{impl}.{node}", kind, index, st[key])
    return hook
