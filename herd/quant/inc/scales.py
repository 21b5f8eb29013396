"""Static scales from maxabs measurements (spec A9) and the scale-cache files (spec A6).

A scale s is the dequant multiplier (x ~= s * fp8(x / s)). With fs the device's full scale
(240 Gaudi2 E4M3, 448 E4M3FN) and b the backoff:
  activation  r = amax / (fs * b_a)                 (b_a = 0.25 by default)
  weight PTS  r = max|W| / (fs * b_w)               (b_w = 0.5)
  weight PCS  r[c] = max(max_j |W[c, j]| / (fs * b_w), tiny_bf16)
then a rounding: IDENTITY, POW2 (2^ceil(log2 r)), HW_ALIGNED (POW2, then up to the device's
exponent step and clamped to its HW scale range), SCALE_UNIT (1), HW_ALIGNED_FIXED (the first HW
scale). OPT searches candidate scales for the least weight quantization error.

Precision follows INC: activation and per-tensor weight scales are computed in `hp_dtype` (bf16 by
default), per-channel weight scales and the OPT searches in the weight's own dtype. log2 of a bf16
value is itself rounded to bf16, so a ratio slightly above a power of two 2^k rounds down to it (up
to ~0.5% for |k| < 4, ~2% for |k| < 16, ~4% for |k| < 32); float64 arithmetic gives 2^(k+1).
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

from herd.quant.formats import TINY_BF16, Fp8Format, ScaleDevice, cast_to_fp8, hw_traits, opt_weight_candidates
from herd.quant.inc.config import IncQuantConfig
from herd.quant.inc.measure import Measurements, NodeStats, read_stats_file
from herd.quant.inc.scale_methods import Granularity, Rounding, TensorRule, ValueType
from herd.quant.inc.nodes import (INC_CLASSES, find_rank_file, infer_node_class, is_selected, measurement_stem,
                                  rank_stems, scale_stem)

HP = torch.bfloat16  # INC's default hp_dtype


# ---- rounding (in the dtype of `raw`, as INC's torch ops do) --------------------------------------
def _pow2(raw: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(raw)))   # 0 -> 0


def round_scale(raw: torch.Tensor, rounding: Rounding, device: ScaleDevice, fmt: Fp8Format) -> torch.Tensor:
    """Round raw scales; the result keeps raw's dtype (a float raw is taken as bf16)."""
    raw = torch.as_tensor(raw, dtype=HP) if not isinstance(raw, torch.Tensor) else raw
    if rounding is Rounding.IDENTITY:
        return raw
    if rounding is Rounding.POW2:
        return _pow2(raw)
    if rounding is Rounding.SCALE_UNIT:
        return torch.ones_like(raw)
    if rounding is Rounding.HW_ALIGNED_FIXED:
        return torch.full_like(raw, opt_weight_candidates(device, fmt)[0])
    if rounding is Rounding.HW_ALIGNED:
        traits = hw_traits(device, fmt)
        if traits is None:  # CUDA: every float scale is "aligned"; a zero amax gets the neutral 1
            return torch.where(raw > 0, raw, torch.ones_like(raw))
        p = _pow2(raw)
        s = 2.0 ** (torch.ceil(torch.log2(p) / traits.step) * traits.step)   # 0 -> 0 -> min below
        lo = torch.tensor(traits.min_scale, dtype=raw.dtype)
        hi = torch.tensor(traits.max_scale, dtype=raw.dtype)
        return torch.minimum(torch.maximum(s, lo), hi)
    raise ValueError(f"unsupported rounding {rounding}")


def _fixed(rule: TensorRule, device: ScaleDevice, fmt: Fp8Format, dtype) -> torch.Tensor:
    return round_scale(torch.tensor(1.0, dtype=dtype), rule.rounding, device, fmt)


# ---- per-tensor kinds ---------------------------------------------------------------------------
def activation_scale_tensor(amax: float, rule: TensorRule, device: ScaleDevice, fmt: Fp8Format,
                            dtype: torch.dtype = HP) -> torch.Tensor:
    """0-d scale in `dtype`: bf16(amax) / (fs * b), rounded in bf16."""
    if rule.granularity is Granularity.PCS:
        raise ValueError("per-token activation scales are computed at run time (dynamic quantization)")
    if rule.value_type is ValueType.FIXED_VALUE:
        return _fixed(rule, device, fmt, dtype)
    if rule.value_type is not ValueType.MAXABS:
        raise ValueError(f"scale value type {rule.value_type.name} is not supported for activations")
    raw = torch.tensor(amax, dtype=dtype) / (fmt.max * rule.backoff)
    return round_scale(raw, rule.rounding, device, fmt)


def activation_scale(amax: float, rule: TensorRule, device: ScaleDevice, fmt: Fp8Format,
                     dtype: torch.dtype = HP) -> float:
    return float(activation_scale_tensor(amax, rule, device, fmt, dtype))


def _rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1)


def _maxabs_pcs(weight: torch.Tensor, backoff: float, fmt: Fp8Format) -> torch.Tensor:
    """Per out channel, in the weight's dtype: max(amax_c / (fs * b), tiny_bf16)."""
    raw = _rows(weight).abs().amax(dim=1) / (fmt.max * backoff)
    return torch.max(raw, torch.tensor(TINY_BF16, dtype=torch.bfloat16))


def _qdq(w: torch.Tensor, s, fmt: Fp8Format, dtype) -> torch.Tensor:
    """s * fp8(w / s), the fp8 values read back in `dtype` before rescaling (INC's order)."""
    return cast_to_fp8(w / s, fmt).to(dtype) * s


def opt_pts_scale(weight: torch.Tensor, candidates, fmt: Fp8Format, dtype: torch.dtype = HP) -> torch.Tensor:
    """Absolute candidate with the least ||W - s*fp8(W/s)||_2 (computed in the weight's dtype);
    ties go to the later candidate."""
    w = weight.detach()
    # the running best is a [1] tensor in hp_dtype: torch.where keeps that dtype, so a float32
    # error is compared against a bf16-rounded best, as in INC
    best, pick = torch.full((1,), math.inf, dtype=dtype), None
    for s in candidates:
        err = torch.norm(w - _qdq(w, s, fmt, dtype))
        if bool(err <= best):
            pick = s
        best = torch.where(err <= best, err, best)
    return torch.tensor(pick, dtype=torch.float32)


def opt_pcs_scale(weight: torch.Tensor, multipliers, backoff: float, fmt: Fp8Format,
                  dtype: torch.dtype = HP) -> torch.Tensor:
    """Per out channel: s_ref = POW2(max(amax_c/(fs*b), tiny)), then the multiplier mu (ascending,
    first minimum wins) that minimises sum_j (W - s*fp8(W/s))^2 with s = mu * s_ref. Laid out
    [in, out] and reduced over dim 0 as INC does, so the sums round the same way."""
    x = _rows(weight).t()
    s_ref = _pow2(_maxabs_pcs(weight, backoff, fmt))
    n = x.shape[1]
    best = torch.full((n,), math.inf, dtype=dtype)
    pick = torch.full((n,), -1.0, dtype=dtype)
    for mu in multipliers:
        mult = torch.full((n,), mu, dtype=dtype)
        s = s_ref[None, :] * mult
        err = torch.sum((x - _qdq(x, s, fmt, dtype)) ** 2, dim=0)
        better = err < best
        pick = torch.where(better, mult, pick)
        best = torch.where(better, err, best)
    return pick * s_ref


def weight_scale(rule: TensorRule, device: ScaleDevice, fmt: Fp8Format, weight: torch.Tensor | None = None,
                 amax: float | None = None, dtype: torch.dtype = HP) -> torch.Tensor:
    """0-d tensor (PTS) or [out] vector (PCS). PTS MAXABS can run from the measured max|W| alone;
    the other kinds need the weight tensor."""
    if rule.value_type is ValueType.FIXED_VALUE:
        return _fixed(rule, device, fmt, dtype)
    if weight is None and not (rule.granularity is Granularity.PTS and rule.value_type is ValueType.MAXABS):
        raise ValueError(f"{rule.granularity.name}/{rule.value_type.name} weight scales need the weight tensor")
    if rule.value_type is ValueType.MAXABS:
        if rule.granularity is Granularity.PCS:
            return round_scale(_maxabs_pcs(weight, rule.backoff, fmt), rule.rounding, device, fmt)
        m = weight.detach().abs().max().to(dtype) if weight is not None else torch.tensor(amax, dtype=dtype)
        return round_scale(m / (fmt.max * rule.backoff), rule.rounding, device, fmt)
    if rule.value_type is ValueType.OPT:
        cands = rule.params.get("weight_scales")
        if rule.granularity is Granularity.PCS:
            s = opt_pcs_scale(weight, cands, rule.backoff, fmt, dtype)
            return round_scale(s, rule.rounding, device, fmt)
        cands = cands if cands is not None else opt_weight_candidates(device, fmt)
        return round_scale(opt_pts_scale(weight, cands, fmt, dtype), rule.rounding, device, fmt)
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
                fill_cold: bool = True, dtype: torch.dtype = HP) -> NodeScales:
    """One node's scales by INC's op rules (ops_quantizer): linear outputs s_x * s_w, row-parallel
    outputs from the measured output amax, matmul outputs s_a * s_b, KV cache outputs = inputs;
    FIXED_VALUE methods give every input, output and weight the fixed scale (matmul: its product)."""
    w_rule, in_rule, out_rule = rules
    dynamic = in_rule.granularity is Granularity.PCS
    act_t = lambda m: activation_scale_tensor(m, in_rule, device, fmt, dtype)  # noqa: E731
    act = lambda m: float(act_t(m))  # noqa: E731
    out = lambda m: float(activation_scale_tensor(m, out_rule, device, fmt, dtype))  # noqa: E731
    fixed = in_rule.value_type is ValueType.FIXED_VALUE
    if op in ("linear", "row_parallel_linear", "embedding"):
        s_w = weight_scale(w_rule, device, fmt, weight, stats.weight, dtype)
        w_in = (torch.ones(_rows(weight).shape[1], dtype=dtype)
                if w_rule.granularity is Granularity.PCS and w_rule.value_type is not ValueType.FIXED_VALUE
                else None)
        if dynamic or op == "embedding":
            return NodeScales(weight=s_w, weight_in=w_in)
        s_x = act_t(stats.inputs[0])
        if fixed:
            s_out = out(0.0)
        elif op == "row_parallel_linear":   # INC: MaxAbsPts on outputs[0], not the product
            s_out = out(_need_outputs(name, stats, 1)[0])
        else:
            s_out = _py(s_w * s_x)
        return NodeScales([float(s_x)], [s_out], s_w, w_in)
    if dynamic:
        return NodeScales()  # activations are scaled per token at run time
    if op == "matmul":
        a, b = act_t(stats.inputs[0]), act_t(stats.inputs[1])
        return NodeScales([float(a), float(b)], [float(a * b)])
    if op == "b2b_matmul":   # input 0 is the 0/1 block mapping; input 1 comes from the output amax
        a, b = act_t(stats.inputs[0]), act_t(_need_outputs(name, stats, 1)[0])
        return NodeScales([float(a), float(b)], [float(a * b)])
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
        return NodeScales([act(m) for m in stats.inputs] + experts, [out(outs[0])])
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
        op = INC_CLASSES.get(cls, op)
        out[name] = node_scales(name, op, stats, config.rules_for(name, cls), dev, fmt,
                                get_w(name), fill_cold, config.hp_torch_dtype)
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


def scale_file_stem(config: IncQuantConfig, rank: int | None = None, world_size: int | None = None,
                    device: "str | ScaleDevice | None" = None) -> str:
    """<dump_stats_path>_hooks_maxabs_<METHOD>[_<rank>_<world>], e.g. ..._MAXABS_HW_0_8. Scales
    herd computes for CUDA (`device` resolving to CUDA) get `<METHOD>_CUDA`: INC on Gaudi reuses any
    cache named after the method, and CUDA's HW_ALIGNED scales are not Gaudi's."""
    method = config.method_name
    if device is not None and config.scale_device(device) is ScaleDevice.CUDA:
        method += "_CUDA"
    return scale_stem(config.dump_stats_path, method, config.observer, rank, world_size)


def _selected(scales: ScaleFile, config: IncQuantConfig, node_classes: Mapping[str, str] | None) -> ScaleFile:
    """A cached scale file holds the nodes selected when it was written; the QUANTIZE config in
    use decides which of them run in FP8 (a node blocklisted since stays in bf16, as in INC, whose
    should_quantize runs before the cache is read)."""
    def keep(name: str, ns: NodeScales) -> bool:
        if node_classes and name in node_classes:
            return is_selected(name, node_classes[name], config)
        try:
            cls = infer_node_class(name, ns.weight is not None, len(ns.outputs) if ns.outputs else None)[0]
        except ValueError:
            return True   # a node herd cannot classify: the file's word stands
        return is_selected(name, cls, config)

    kept = {n: ns for n, ns in scales.nodes.items() if keep(n, ns)}
    return ScaleFile(kept, scales.local_rank, scales.global_rank)


def scales_for_rank(config: IncQuantConfig, rank: int | None = None, world_size: int | None = None,
                    device: "str | ScaleDevice" = ScaleDevice.CUDA, weights: "WeightSource" = None,
                    node_classes: Mapping[str, str] | None = None) -> ScaleFile:
    """QUANTIZE-time entry point, INC's caching included: reuse the rank's scale cache unless
    `recalc_scales` (or a dict-form scale_method, which INC always recomputes and herd never
    caches); otherwise read the rank's measurements, compute the scales and write the cache. A
    single rank (rank None or world 1) reads `_0_1` or unsuffixed files and writes `_0_1` (see
    nodes.rank_stems). For CUDA the cache is `<METHOD>_CUDA`; INC's own cache (e.g. from vLLM-HPU's step 4) is used only when there are no
    measurements to compute from."""
    separate = config.seperate_measure_files
    recalc = config.recalc_scales or config.scale_method.from_dict
    stems = lambda dev: rank_stems(lambda r, w: scale_file_stem(config, r, w, dev), rank, world_size, separate)  # noqa: E731
    own = stems(device)
    cached = find_rank_file(own)
    if cached is not None and not recalc:
        return _selected(ScaleFile.load(cached), config, node_classes)
    meas_stems = rank_stems(lambda r, w: measurement_stem(config.dump_stats_path, config.observer, r, w),
                            rank, world_size, separate)
    meas = find_rank_file(meas_stems)
    if meas is None:
        inc_cache = find_rank_file(stems(None))
        if inc_cache is not None and not recalc:
            return _selected(ScaleFile.load(inc_cache), config, node_classes)
        tried = " or ".join(Path(st + ".npz").name for st in meas_stems)
        raise FileNotFoundError(
            f"no measurements for rank {rank if rank is not None else 0} of {world_size or 1} in "
            f"{Path(meas_stems[0]).parent} (looked for {tried}): run `herd calibrate` (MEASURE) first, "
            "or unify existing measurements to this world size (`herd calibrate ... -r N`)")
    scales = compute_scales(Measurements.load(meas), config, device, weights, node_classes, progress=True)
    if not config.scale_method.from_dict:
        # a dict-form method is recomputed every time, and its file would carry the preset's name:
        # a later run with the plain preset would read these scales as its own
        scales.save(own[0])
    return scales
