"""Deployment planner: parameter counts, per-device memory, KV cache and roofline speed.

Needs only a config (no weights, no torch), so the server and benchmarks can reuse it, e.g.
`make_plan(load_model_spec("scout"), get_device("gaudi3"), PlanSettings())`.
"""
from herd.plan.hardware import DeviceSpec, catalog, get_device
from herd.plan.memory import MemoryPlan, PlanSettings, kv_cache_layout, plan_memory, recommend_tp
from herd.plan.models import ModelSpec, load_model_spec, spec_from_dict
from herd.plan.params import ParamCounts, count_params, weight_bytes
from herd.plan.planner import PlanResult, make_plan
from herd.plan.roofline import decode_estimate, prefill_estimate

__all__ = ["DeviceSpec", "MemoryPlan", "ModelSpec", "ParamCounts", "PlanResult", "PlanSettings",
           "catalog", "count_params", "decode_estimate", "get_device", "kv_cache_layout",
           "load_model_spec", "make_plan", "plan_memory", "prefill_estimate", "recommend_tp",
           "spec_from_dict", "weight_bytes"]
