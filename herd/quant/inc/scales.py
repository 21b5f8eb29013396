"""Static scales from maxabs measurements (spec A9) and the scale-cache files (spec A6).

A scale s is the dequant multiplier (x ~= s * fp8(x / s)). With fs the device's full scale
(240 Gaudi2 E4M3, 448 E4M3FN) and b the backoff:
  activation  r = amax / (fs * b_a)                 (b_a = 0.25 by default)
  weight PTS  r = max|W| / (fs * b_w)               (b_w = 0.5)
  weight PCS  r[c] = max(max_j |W[c, j]| / (fs * b_w), tiny_bf16)
then a rounding: IDENTITY, POW2 (2^ceil(log2 r), always up), HW_ALIGNED (POW2, then up to the
device's exponent step and clamped to its HW scale range), SCALE_UNIT (1), HW_ALIGNED_FIXED (the
first HW scale). OPT searches candidate scales for the least weight quantization error.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from herd.quant.formats import (TINY_BF16, Fp8Format, ScaleDevice, hw_traits, opt_weight_candidates,
                                pow2_ceil, qdq)
from herd.quant.inc.config import IncQuantConfig
from herd.quant.inc.measure import Measurements, NodeStats, read_stats_file
from herd.quant.inc.scale_methods import Granularity, Rounding, TensorRule, ValueType
from herd.quant.inc.nodes import infer_node_class, is_selected, measurement_stem, scale_stem

# ---- rounding -----------------------------------------------------------------------------------
def _exponent_of_pow2(p: torch.Tensor) -> torch.Tensor:
    _, e = torch.frexp(p)   # p = 0.5 * 2^e exactly for powers of two
    return e - 1


def round_scale(raw: torch.Tensor, rounding: Rounding, device: ScaleDevice, fmt: Fp8Format) -> torch.Tensor:
    raw = torch.as_tensor(raw, dtype=torch.float64)
    if rounding is Rounding.IDENTITY:
        return raw
    if rounding is Rounding.POW2:
        return pow2_ceil(raw)
    if rounding is Rounding.SCALE_UNIT:
        return torch.ones_like(raw)
    if rounding is Rounding.HW_ALIGNED_FIXED:
        return torch.full_like(raw, max(opt_weight_candidates(device, fmt)))
    if rounding is Rounding.HW_ALIGNED:
        traits = hw_traits(device, fmt)
        if traits is None:  # CUDA: every float scale is "aligned"; a zero amax gets the neutral 1
            return torch.where(raw > 0, raw, torch.ones_like(raw))
        k = _exponent_of_pow2(pow2_ceil(torch.where(raw > 0, raw, torch.ones_like(raw))))
        k = torch.div(k + traits.step - 1, traits.step, rounding_mode="floor") * traits.step  # ceil to step
        s = torch.ldexp(torch.ones_like(raw), k).clamp(traits.min_scale, traits.max_scale)
        return torch.where(raw > 0, s, torch.full_like(raw, traits.min_scale))
    raise ValueError(f"unsupported rounding {rounding}")


# ---- per-tensor kinds ---------------------------------------------------------------------------
def activation_scale(amax: float, rule: TensorRule, device: ScaleDevice, fmt: Fp8Format) -> float:
    if rule.granularity is Granularity.PCS:
        raise ValueError("per-token activation scales are computed at run time (dynamic quantization)")
    if rule.value_type is ValueType.FIXED_VALUE:
        raw = 1.0
    elif rule.value_type is ValueType.MAXABS:
        raw = amax / (fmt.max * rule.backoff)
    else:
        raise ValueError(f"scale value type {rule.value_type.name} is not supported for activations")
    return float(round_scale(torch.tensor(raw), rule.rounding, device, fmt))


def _channel_amax(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().reshape(weight.shape[0], -1).abs().amax(dim=1).double()


def opt_pts_scale(weight: torch.Tensor, candidates, fmt: Fp8Format) -> float:
    """Absolute candidate with the least ||W - s*fp8(W/s)||_2; ties go to the later candidate."""
    w = weight.detach().float()
    best, pick = math.inf, None
    for s in candidates:
        err = torch.linalg.vector_norm(w - qdq(w, s, fmt)).item()
        if err <= best:
            best, pick = err, float(s)
    return pick


def opt_pcs_scale(weight: torch.Tensor, multipliers, backoff: float, fmt: Fp8Format) -> torch.Tensor:
    """Per out channel: s_ref = POW2(max(amax_c/(fs*b), tiny)), then the multiplier mu (ascending,
    first minimum wins) that minimises sum_j (W - s*fp8(W/s))^2 with s = mu * s_ref."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    s_ref = pow2_ceil(torch.clamp(_channel_amax(w) / (fmt.max * backoff), min=TINY_BF16))
    best = torch.full((w.shape[0],), math.inf, dtype=torch.float64)
    pick = s_ref.clone()
    for mu in multipliers:
        s = s_ref * mu
        err = (w - qdq(w, s.float()[:, None], fmt)).double().pow(2).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        pick = torch.where(better, s, pick)
    return pick


def weight_scale(rule: TensorRule, device: ScaleDevice, fmt: Fp8Format, weight: torch.Tensor | None = None,
                 amax: float | None = None) -> torch.Tensor:
    """0-d tensor (PTS) or [out] vector (PCS). PTS MAXABS can run from the measured max|W| alone;
    the other kinds need the weight tensor."""
    if rule.value_type is ValueType.FIXED_VALUE:
        return round_scale(torch.tensor(1.0), rule.rounding, device, fmt)
    if weight is None and not (rule.granularity is Granularity.PTS and rule.value_type is ValueType.MAXABS):
        raise ValueError(f"{rule.granularity.name}/{rule.value_type.name} weight scales need the weight tensor")
    if rule.value_type is ValueType.MAXABS:
        if rule.granularity is Granularity.PCS:
            raw = torch.clamp(_channel_amax(weight) / (fmt.max * rule.backoff), min=TINY_BF16)
        else:
            m = weight.detach().float().abs().max() if weight is not None else torch.tensor(amax)
            raw = m.double() / (fmt.max * rule.backoff)
        return round_scale(raw, rule.rounding, device, fmt)
    if rule.value_type is ValueType.OPT:
        cands = rule.params.get("weight_scales")
        if rule.granularity is Granularity.PCS:
            return round_scale(opt_pcs_scale(weight, cands, rule.backoff, fmt), rule.rounding, device, fmt)
        cands = cands if cands is not None else opt_weight_candidates(device, fmt)
        return round_scale(torch.tensor(opt_pts_scale(weight, cands, fmt)), rule.rounding, device, fmt)
    raise ValueError(f"scale value type {rule.value_type.name} is not supported for weights")


def fill_cold_experts(amax: list[float]) -> tuple[list[float | None], list[int]]:
    """Experts that saw no tokens (amax 0) borrow the largest amax of the layer's other experts
    (INC would give them the minimum scale and overflow on the first real token). None when no
    expert of the layer was reached."""
    warm = [a for a in amax if a > 0]
    fill = max(warm) if warm else None
    return [a if a > 0 else fill for a in amax], [e for e, a in enumerate(amax) if not a > 0]


# ---- per node -----------------------------------------------------------------------------------
@dataclass
class NodeScales:
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    weight: torch.Tensor | None = None      # 0-d (PTS) or [out] (PCS)
    weight_in: torch.Tensor | None = None   # PCS only: the in-channel scale (ones)


def node_scales(name: str, op: str, stats: NodeStats, rules: tuple[TensorRule, TensorRule, TensorRule],
                device: ScaleDevice, fmt: Fp8Format, weight: torch.Tensor | None = None,
                fill_cold: bool = True) -> NodeScales:
    w_rule, in_rule, out_rule = rules
    dynamic = in_rule.granularity is Granularity.PCS
    act = lambda m: activation_scale(m, in_rule, device, fmt)  # noqa: E731
    out = lambda m: activation_scale(m, out_rule, device, fmt)  # noqa: E731
    if op in ("linear", "row_parallel_linear", "embedding"):
        s_w = weight_scale(w_rule, device, fmt, weight, stats.weight)
        w_in = (torch.ones(weight[0].numel(), dtype=torch.float64)
                if w_rule.granularity is Granularity.PCS else None)
        if dynamic:
            return NodeScales(weight=s_w, weight_in=w_in)
        s_x = act(stats.inputs[0])
        return NodeScales([s_x], [s_x * s_w if s_w.dim() else s_x * float(s_w)], s_w, w_in)
    if dynamic:
        return NodeScales()  # activations are scaled per token at run time
    if op == "matmul":
        a, b = act(stats.inputs[0]), act(stats.inputs[1])
        return NodeScales([a, b], [a * b])
    if op == "b2b_matmul":
        a, b = act(stats.inputs[0]), act(_need_outputs(name, stats, 1)[0])
        return NodeScales([a, b], [a * b])
    if op == "kv_cache":
        s = act(stats.inputs[0])
        return NodeScales([s], [s])
    if op == "softmax":
        return NodeScales([], [out(_need_outputs(name, stats, 1)[0])])
    if op == "fused_sdpa":
        outs = _need_outputs(name, stats, 2)
        return NodeScales([act(m) for m in stats.inputs[:3]] + [act(outs[1])], [out(outs[0])])
    if op == "dynamic_moe":
        outs = _need_outputs(name, stats, 2)
        amax = outs[1:]
        if fill_cold:
            amax, _ = fill_cold_experts(amax)
        widest = max(opt_weight_candidates(device, fmt))
        experts = [act(m) if m is not None else widest for m in amax]
        return NodeScales([act(stats.inputs[0])] + experts, [out(outs[0])])
    raise ValueError(f"{name}: no scale rule for op type {op!r}")


def _need_outputs(name: str, stats: NodeStats, n: int) -> list[float]:
    if stats.outputs is None or len(stats.outputs) < n:
        raise ValueError(f"{name}: the measurement has no outputs; this op needs them")
    return stats.outputs


WeightSource = Union[Mapping[str, torch.Tensor], Callable[[str], Optional[torch.Tensor]], None]


def compute_scales(meas: Measurements, config: IncQuantConfig, device: "str | ScaleDevice" = ScaleDevice.CUDA,
                   weights: "WeightSource" = None, node_classes: Mapping[str, str] | None = None,
                   fill_cold: bool = True, progress: bool = False) -> "ScaleFile":
    """Scales for every selected node of one rank's measurements. `device` is the one herd runs on
    (config.device_for_scales overrides it). `weights` maps INC node names to rank-local weights
    (needed by PCS and OPT methods; PTS maxabs falls back to the measured max|W|). `node_classes`
    gives INC class names; otherwise they are inferred from the node names."""
    dev = config.scale_device(device)
    fmt = config.format_for(dev)
    get_w = weights.get if isinstance(weights, Mapping) else (weights or (lambda _n: None))
    out: dict[str, NodeScales] = {}
    items = list(meas.nodes.items())
    for name, stats in tqdm(items, desc="scales", disable=not progress or len(items) < 2):
        inferred_cls, op = infer_node_class(name, stats.weight is not None,
                                            len(stats.outputs) if stats.outputs else None)
        cls = (node_classes or {}).get(name, inferred_cls)
        if not is_selected(name, cls, config):
            continue
        out[name] = node_scales(name, op, stats, config.rules_for(name, cls), dev, fmt,
                                get_w(name), fill_cold)
    return ScaleFile(out, local_rank=meas.local_rank)


# ---- scale-cache file (A6) ----------------------------------------------------------------------
def _to_json(v):
    t = torch.as_tensor(v, dtype=torch.float64)
    return float(t) if t.dim() == 0 else t.tolist()


def _to_np(v):
    return np.asarray(torch.as_tensor(v, dtype=torch.float64).numpy(), dtype=np.float32)


@dataclass
class ScaleFile:
    nodes: dict[str, NodeScales]
    local_rank: int | None = -1
    global_rank: int | None = None

    def to_dict(self, as_numpy: bool = False) -> dict:
        conv = _to_np if as_numpy else _to_json
        nodes = {}
        for name, ns in self.nodes.items():
            params: dict = {}
            if ns.weight is not None:
                if ns.weight_in is not None:
                    k0, k1 = (0, 1) if as_numpy else ("0", "1")
                    params["weight"] = {k0: conv(ns.weight), k1: conv(ns.weight_in)}
                else:
                    params["weight"] = conv(ns.weight)
            nodes[name] = {"inputs": [conv(s) for s in ns.inputs], "outputs": [conv(s) for s in ns.outputs],
                           "params": params}
        return {"GlobalRank": self.global_rank, "LocalRank": self.local_rank, "Mode": "Scale", "Nodes": nodes}

    def save(self, stem: str | Path) -> list[Path]:
        stem = str(stem)
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        paths = [Path(stem + ".json"), Path(stem + ".npz")]
        paths[0].write_text(json.dumps(self.to_dict(), indent=4))
        np.savez(paths[1], self.to_dict(as_numpy=True))
        return paths

    @classmethod
    def load(cls, path: str | Path) -> "ScaleFile":
        raw = read_stats_file(path)
        if raw.get("Mode") != "Scale":
            raise ValueError(f"{path}: Mode is {raw.get('Mode')!r}; expected 'Scale'")
        t = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float64))  # noqa: E731
        nodes = {}
        for name, e in raw["Nodes"].items():
            w = (e.get("params") or {}).get("weight")
            w_out = w_in = None
            if isinstance(w, dict):
                w = {int(k): v for k, v in w.items()}
                w_out, w_in = t(w[0]), t(w[1])
            elif w is not None:
                w_out = t(w)
            nodes[name] = NodeScales([_py(t(s)) for s in e.get("inputs", [])],
                                     [_py(t(s)) for s in e.get("outputs", [])], w_out, w_in)
        return cls(nodes, raw.get("LocalRank"), raw.get("GlobalRank"))


def _py(v: torch.Tensor):
    return float(v) if v.dim() == 0 else v


def scale_file_stem(config: IncQuantConfig, rank: int | None = None, world_size: int | None = None) -> str:
    """<dump_stats_path>_hooks_maxabs_<METHOD>[_<rank>_<world>], e.g. ..._MAXABS_HW_0_8."""
    return scale_stem(config.dump_stats_path, config.method_name, config.observer, rank, world_size)


def scales_for_rank(config: IncQuantConfig, rank: int | None = None, world_size: int | None = None,
                    device: "str | ScaleDevice" = ScaleDevice.CUDA, weights: "WeightSource" = None,
                    node_classes: Mapping[str, str] | None = None) -> ScaleFile:
    """QUANTIZE-time entry point, INC's caching included: reuse `<P>_hooks_maxabs_<METHOD><sfx>.npz`
    unless `recalc_scales` (or a dict-form scale_method, which INC always recomputes); otherwise read
    the rank's measurements, compute the scales and write the cache."""
    separate = config.seperate_measure_files
    sfx = (rank, world_size) if separate else (None, None)
    stem = scale_file_stem(config, *sfx)
    if Path(stem + ".npz").exists() and not (config.recalc_scales or config.scale_method.from_dict):
        return ScaleFile.load(stem + ".npz")
    meas_stem = measurement_stem(config.dump_stats_path, config.observer, *sfx)
    if not Path(meas_stem + ".npz").exists():
        raise FileNotFoundError(f"no measurements at {meas_stem}.npz for rank {rank} of {world_size}: run "
                                "`herd calibrate` (MEASURE) first, or unify existing measurements to this world size")
    scales = compute_scales(Measurements.load(meas_stem + ".npz"), config, device, weights, node_classes,
                            progress=True)
    scales.save(stem)
    return scales
