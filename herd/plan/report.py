"""Render a PlanResult as plain-text tables or as a JSON-ready dict."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from herd.plan.hardware import GiB
from herd.plan.memory import KV_CACHE_DTYPES, MemoryPlan
from herd.plan.params import BF16_UNDER_QUANT, CATEGORIES, WEIGHT_DTYPES
from herd.plan.planner import PlanResult


def table(headers: list[str], rows: list[list[str]], indent: str = "  ", left: int = 1) -> list[str]:
    """Left-align the first `left` columns (labels), right-align the rest (numbers)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    def line(r):
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return (indent + "  ".join(cells)).rstrip()
    return [line(headers)] + [line(r) for r in rows]


def _g(n: float) -> str:
    return f"{n / GiB:,.2f}"


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def _model_line(r: PlanResult) -> str:
    t = r.model.text
    L = t.num_hidden_layers
    moe = sum(1 for i in range(L) if t.is_moe_layer(i))
    nope = sum(1 for i in range(L) if not t.is_rope_layer(i))
    kv = "bf16" if KV_CACHE_DTYPES[r.settings.kv_cache_dtype] == 2 else "fp8"
    return (f"{r.model.name} ({r.model.source}): {L} layers, {moe} MoE x {t.num_local_experts} experts "
            f"top-{t.num_experts_per_tok}, {nope} NoPE; weights {r.settings.dtype}, KV cache {kv}")


def _param_rows(r: PlanResult) -> list[list[str]]:
    rows = []
    for c in CATEGORIES:
        if r.params.total[c]:
            rows.append([c, f"{r.params.total[c]:,}", f"{r.params.active[c]:,}",
                         *(_g(r.weight_bytes[d][c]) for d in WEIGHT_DTYPES)])
    rows.append(["total", f"{r.params.total_params:,}", f"{r.params.active_params:,}",
                 *(_g(sum(r.weight_bytes[d].values())) for d in WEIGHT_DTYPES)])
    return rows


def _memory_rows(plans: list[MemoryPlan]) -> list[list[str]]:
    return [[str(p.tp), _g(p.weight_bytes), _g(p.workspace.total), _g(p.kv_budget_bytes),
             _g(p.kv_bytes_per_seq), f"{p.max_concurrent_seqs:,}", f"{p.max_context_len:,}",
             "yes" if p.fits else "no"] for p in plans]


def format_text(r: PlanResult) -> str:
    s, p, dev = r.settings, r.plan, r.device
    out = [_model_line(r), f"Device: {dev.describe()}", "",
           "Parameters and weight memory (GiB)"]
    out += table(["module", "total", "active/token", *WEIGHT_DTYPES], _param_rows(r))
    out.append(f"  fp8 and int4 keep BF16: {', '.join(BF16_UNDER_QUANT)}; embeddings and norms "
               "are not Linear layers and stay BF16")
    out += ["", f"Memory per device (GiB): budget {s.gpu_memory_utilization:g} x {dev.memory_gib:g} GiB = "
            f"{_g(p.budget_bytes)}; max_model_len {s.max_model_len:,}, max_num_seqs {s.max_num_seqs}, "
            f"max_num_batched_tokens {s.max_num_batched_tokens:,}"]
    plans = r.recommendation.plans if r.recommendation else [p]
    out += table(["TP", "weights", "workspace", "KV budget", "KV/seq", "max seqs", "max context", "fits"],
                 _memory_rows(plans))
    cap = r.model.text.max_position_embeddings
    if any(x.max_context_len == cap for x in plans):
        out.append(f"  max context is capped at the model's max_position_embeddings ({cap:,})")
    kv = p.kv
    out.append(f"  KV cache per token per device at TP={p.tp}: {_kib(kv.bytes_per_token_in_chunk)} within "
               f"the first {kv.chunk_size:,} tokens ({kv.full_layers + kv.chunked_layers} layers), "
               f"{_kib(kv.bytes_per_token_past_chunk)} past it ({kv.full_layers} full-attention layers)"
               if kv.chunked_layers else
               f"  KV cache per token per device at TP={p.tp}: {_kib(kv.bytes_per_token_in_chunk)}")
    w = p.workspace
    out.append(f"  workspace = activations {_g(w.activation_bytes)} + logits {_g(w.logits_bytes)} "
               f"+ runtime reserve {_g(w.reserve_bytes)}")
    out.append("")
    if r.recommendation is not None:
        out.append(("Recommended: " if r.recommendation.tp else "Does not fit: ") + r.recommendation.reason)
    else:
        out.append(f"TP={p.tp}: " + ("fits, " if p.fits else "does not fit: ") + p.reason)
    note = "" if p.fits else "; it does not fit, so these assume it did"
    out += ["", f"Roofline at TP={p.tp}, {r.decode[0].context_len:,} tokens of context per sequence "
            f"(upper bound: datasheet peaks, no communication{note})"]
    out += table(["batch", "step ms", "tok/s/seq", "tok/s total", "bound"],
                 [[str(d.batch_size), f"{d.step.time_s * 1e3:,.2f}", f"{d.tokens_per_s_per_seq:,.1f}",
                   f"{d.tokens_per_s:,.0f}", d.step.bound] for d in r.decode])
    f = r.prefill
    out.append(f"  prefill of one {f.prompt_len:,}-token prompt in chunks of {f.chunk_tokens:,}: "
               f"{f.time_s:,.3f} s ({f.tokens_per_s:,.0f} tok/s), mostly {f.bound}-bound")
    if dev.fp8_max == 240 and s.dtype == "fp8":
        out.append(f"  note: {dev.name} FP8 tops out at 240; E4M3FN checkpoints (max 448) need their "
                   "scales rescaled (halve the FP8 values, double the scales)")
    return "\n".join(out)


def _plan_dict(p: MemoryPlan) -> dict[str, Any]:
    return {
        "tp": p.tp, "fits": p.fits, "reason": p.reason, "capacity_bytes": p.capacity_bytes,
        "budget_bytes": p.budget_bytes, "weight_bytes": p.weight_bytes,
        "workspace_bytes": {**asdict(p.workspace), "total": p.workspace.total},
        "kv_budget_bytes": p.kv_budget_bytes,
        "kv_bytes_per_token_in_chunk": p.kv.bytes_per_token_in_chunk,
        "kv_bytes_per_token_past_chunk": p.kv.bytes_per_token_past_chunk,
        "kv_bytes_per_seq": p.kv_bytes_per_seq, "max_concurrent_seqs": p.max_concurrent_seqs,
        "batch_size": p.batch_size, "max_context_len": p.max_context_len,
    }


def to_dict(r: PlanResult) -> dict[str, Any]:
    t = r.model.text
    L = t.num_hidden_layers
    rec = r.recommendation
    return {
        "model": {
            "name": r.model.name, "source": r.model.source, "checkpoint_dtype": r.model.checkpoint_dtype,
            "num_hidden_layers": L, "moe_layers": sum(1 for i in range(L) if t.is_moe_layer(i)),
            "num_local_experts": t.num_local_experts, "num_experts_per_tok": t.num_experts_per_tok,
            "nope_layers": sum(1 for i in range(L) if not t.is_rope_layer(i)),
            "attention_chunk_size": t.attention_chunk_size,
            "max_position_embeddings": t.max_position_embeddings, "has_vision": r.model.vision is not None,
        },
        "device": asdict(r.device),
        "settings": asdict(r.settings),
        "params": {"total": dict(r.params.total), "active": dict(r.params.active),
                   "total_params": r.params.total_params, "active_params": r.params.active_params,
                   "active_params_no_embedding": r.params.active_params_no_embedding},
        "weight_bytes": {d: {**b, "total": sum(b.values())} for d, b in r.weight_bytes.items()},
        "bf16_under_quant": list(BF16_UNDER_QUANT),
        "recommended_tp": rec.tp if rec else None,
        "recommendation": rec.reason if rec else None,
        "tp_candidates": [_plan_dict(p) for p in rec.plans] if rec else None,
        "plan": _plan_dict(r.plan),
        "decode": [{"batch_size": d.batch_size, "context_len": d.context_len,
                    "bytes_per_step": d.step.bytes, "step_time_s": d.step.time_s, "bound": d.step.bound,
                    "tokens_per_s_per_seq": d.tokens_per_s_per_seq, "tokens_per_s": d.tokens_per_s}
                   for d in r.decode],
        "prefill": {"prompt_len": r.prefill.prompt_len, "chunk_tokens": r.prefill.chunk_tokens,
                    "time_s": r.prefill.time_s, "tokens_per_s": r.prefill.tokens_per_s,
                    "bound": r.prefill.bound},
    }
