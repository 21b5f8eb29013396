"""One call that answers the hardware questions: counts, memory at a TP (or the smallest TP that
fits), and the roofline speed at that TP."""
from __future__ import annotations

from dataclasses import dataclass

from herd.plan.hardware import DeviceSpec
from herd.plan.memory import MemoryPlan, PlanSettings, Recommendation, plan_memory, recommend_tp
from herd.plan.models import ModelSpec
from herd.plan.params import WEIGHT_DTYPES, ParamCounts, count_params, weight_bytes
from herd.plan.roofline import DecodeEstimate, PrefillEstimate, decode_estimate, prefill_estimate


@dataclass(frozen=True)
class PlanResult:
    model: ModelSpec
    device: DeviceSpec
    settings: PlanSettings
    params: ParamCounts
    weight_bytes: dict[str, dict[str, int]]   # dtype -> category -> bytes
    plan: MemoryPlan                          # the given TP, the recommended one, or the largest tried
    recommendation: Recommendation | None     # set when no TP was given
    decode: list[DecodeEstimate]
    prefill: PrefillEstimate


def decode_batch_sizes(plan: MemoryPlan, batch_size: int | None) -> list[int]:
    if batch_size is not None:
        return sorted({1, batch_size})
    top = max(1, plan.batch_size)
    return sorted({b for b in (1, 8, 32, 128) if b < top} | {top})


def make_plan(model: ModelSpec, device: DeviceSpec, settings: PlanSettings, tp: int | None = None,
              batch_size: int | None = None, context_len: int | None = None) -> PlanResult:
    settings.validate(model.text.max_position_embeddings)
    context = settings.max_model_len if context_len is None else context_len
    if not 0 < context <= settings.max_model_len:
        raise ValueError(f"--context-len must be in [1, max_model_len={settings.max_model_len}], got {context}")
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    rec = None
    if tp is None:
        rec = recommend_tp(model, device, settings)
        chosen = next((p for p in rec.plans if p.tp == rec.tp), rec.plans[-1])
    else:
        chosen = plan_memory(model, device, tp, settings)
    dtype = settings.dtype
    decode = [decode_estimate(model, device, dtype, chosen.tp, chosen.kv, b, context)
              for b in decode_batch_sizes(chosen, batch_size)]
    prefill = prefill_estimate(model, device, dtype, chosen.tp, chosen.kv, context,
                               settings.max_num_batched_tokens)
    return PlanResult(model, device, settings, count_params(model.groups),
                      {d: weight_bytes(model.groups, d) for d in WEIGHT_DTYPES},
                      chosen, rec, decode, prefill)
