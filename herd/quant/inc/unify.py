"""Measurement post-processing: step-3 fix-ups, TP unification N -> R (any R), EP re-splitting,
and the calibration coverage report (experts that never received a token).

Unification rule. TP shards are contiguous slices of a dimension, so target rank i of R covers the
fraction [i/R, (i+1)/R) and source rank j of N covers [j/N, (j+1)/N). A maxabs over a slice is at
most the max over any set of slices that covers it, so target rank i takes the element-wise max over
the source ranks whose fractions overlap its own:
* R < N, N % R == 0: exactly INC's step-5 (groups of N/R adjacent ranks);
* R = N: a copy;
* R > N: each target rank inherits its parent's (or parents') values, a safe over-estimate where
  INC refuses. Replicated tensors (column-parallel inputs, KV heads when TP > num_kv_heads) are
  the same on every rank, so the rule holds for them as well.
The one value this does not bound is a row-parallel linear's outputs[0] (per-rank partial sums)
for R > N. INC turns it into that linear's output scale, which only the FP8 all-reduce
(`row_parallel_linear_allreduce_quantization`) uses; herd never uses it.

Expert parallel: each rank holds E/N whole experts. Their per-expert lists are concatenated in
rank order into the global expert list and re-split into R equal parts; expert weight nodes
(`moe_op.w13_list.<e>`) are renamed to the new local indices.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from herd.quant.inc.measure import Measurements, NodeStats
from herd.quant.inc.nodes import LAYER_RE, find_measurement_sets, measurement_stem

_EXPERT_NODE = re.compile(r"^(?P<moe>.*\.moe_op)\.(?P<w>w13|w2)_list\.(?P<e>\d+)$")


def _is_moe(name: str) -> bool:
    return name.endswith(".moe_op")


def overlapping_ranks(target: int, target_world: int, source_world: int) -> list[int]:
    """Source ranks whose contiguous shard overlaps target rank's shard."""
    return [j for j in range(source_world)
            if j * target_world < (target + 1) * source_world and (j + 1) * target_world > target * source_world]


def _max_lists(name: str, field: str, lists: list[list[float] | None]) -> list[float] | None:
    present = [x for x in lists if x is not None]
    if not present:
        return None
    if len({len(x) for x in present}) > 1:
        raise ValueError(f"{name}: {field} have different lengths across ranks "
                         f"{[len(x) for x in present]}; expert-parallel measurements need expert_parallel=True")
    return [max(vals) for vals in zip(*present)]


def _merge(name: str, stats: list[NodeStats]) -> NodeStats:
    weights = [s.weight for s in stats if s.weight is not None]
    return NodeStats(inputs=_max_lists(name, "inputs", [s.inputs for s in stats]) or [],
                     outputs=_max_lists(name, "outputs", [s.outputs for s in stats]),
                     weight=max(weights) if weights else None)


def _global_experts(ranks: list[Measurements], moe: str) -> list[float]:
    """Concatenate outputs[1:] (per local expert) of an EP MoE node in rank order."""
    out: list[float] = []
    for m in ranks:
        st = m.nodes.get(moe)
        if st is None or st.outputs is None:
            raise ValueError(f"{moe}: missing or has no outputs on some rank")
        out += st.outputs[1:]
    return out


def unify(ranks: list[Measurements], target_world: int, expert_parallel: bool = False) -> list[Measurements]:
    """Measurements of N ranks (in rank order) -> measurements for `target_world` ranks."""
    n = len(ranks)
    if n == 0 or target_world < 1:
        raise ValueError("need at least one source rank and a target world size >= 1")
    names = list(dict.fromkeys(name for m in ranks for name in m.nodes))
    experts = {}  # moe node -> (global amax list, global index offset of each source rank)
    if expert_parallel:
        for moe in filter(_is_moe, names):
            glob = _global_experts(ranks, moe)
            if len(glob) % target_world:
                raise ValueError(f"{moe}: {len(glob)} experts cannot be split evenly over {target_world} ranks")
            offsets = [0]
            for m in ranks:
                offsets.append(offsets[-1] + len(m.nodes[moe].outputs) - 1)
            experts[moe] = (glob, offsets)
    result = []
    for i in range(target_world):
        group = [ranks[j] for j in overlapping_ranks(i, target_world, n)]
        nodes: dict[str, NodeStats] = {}
        for name in names:
            m = _EXPERT_NODE.match(name)
            if expert_parallel and m and m["moe"] in experts:
                continue  # expert weight nodes are re-indexed below
            stats = [r.nodes[name] for r in group if name in r.nodes]
            if not stats:
                continue
            if expert_parallel and name in experts:
                glob, _ = experts[name]
                per = len(glob) // target_world
                hidden = _merge(name, [NodeStats(s.inputs, s.outputs[:1], None) for s in stats])
                nodes[name] = NodeStats(hidden.inputs, hidden.outputs + glob[i * per:(i + 1) * per])
            else:
                nodes[name] = _merge(name, stats)
        if expert_parallel:
            nodes.update(_split_expert_nodes(ranks, experts, i, target_world))
        result.append(Measurements(nodes, local_rank=i if target_world > 1 else -1))
    return result


def _split_expert_nodes(ranks, experts, i, target_world) -> dict[str, NodeStats]:
    out = {}
    for moe, (glob, offsets) in experts.items():
        per = len(glob) // target_world
        lo = i * per
        for j, m in enumerate(ranks):
            for name, st in m.nodes.items():
                em = _EXPERT_NODE.match(name)
                if not em or em["moe"] != moe:
                    continue
                g = offsets[j] + int(em["e"])
                if lo <= g < lo + per:
                    out[f"{moe}.{em['w']}_list.{g - lo}"] = NodeStats(list(st.inputs), None, st.weight)
    return dict(sorted(out.items(), key=lambda kv: _expert_sort_key(kv[0])))


def _expert_sort_key(name: str):
    m = _EXPERT_NODE.match(name)
    return (m["moe"], m["w"] != "w13", int(m["e"]))


def expand_experts(tp1: Measurements, ep_world: int) -> list[Measurements]:
    """Step-6 equivalent: one unified rank -> `ep_world` expert-parallel ranks, with the expert
    weight nodes re-indexed to local indices (INC keeps the global ones)."""
    return unify([tp1], ep_world, expert_parallel=True)


def load_rank_set(prefix: str | Path, source_world: int | None = None,
                  observer: str = "maxabs") -> list[Measurements]:
    sets = find_measurement_sets(prefix, observer)
    if not sets:
        raise FileNotFoundError(f"no measurement files {prefix}_hooks_{observer}_<rank>_<world>.npz/.json")
    if source_world is None:
        if len(sets) > 1:
            raise ValueError(f"measurements for several world sizes {sorted(sets)} under {prefix}; "
                             "say which one to start from (source_world / --from-world)")
        source_world = next(iter(sets))
    files = sets.get(source_world)
    if files is None:
        raise FileNotFoundError(f"no measurement files for world size {source_world} under {prefix}")
    missing = [r for r in range(source_world) if r not in files]
    if missing:
        raise FileNotFoundError(f"measurements for world size {source_world} lack ranks {missing}")
    return [Measurements.load(files[r]) for r in range(source_world)]


def unify_files(prefix: str | Path, target_world: int, out_prefix: str | Path | None = None,
                source_world: int | None = None, expert_parallel: bool = False) -> list[Path]:
    """Read `<prefix>_hooks_maxabs_<r>_<N>` for all r, write `<out_prefix>_hooks_maxabs_<i>_<R>`
    (.json, .npz and a fresh _mod_list.json)."""
    ranks = load_rank_set(prefix, source_world)
    out_prefix = Path(out_prefix or prefix)
    written = []
    for i, m in enumerate(unify(ranks, target_world, expert_parallel)):
        stem = measurement_stem(out_prefix, "maxabs", i, target_world)
        written += m.save(stem)
    stale = sorted(out_prefix.parent.glob(f"{out_prefix.name}_hooks_maxabs_[A-Z]*_{target_world}.npz"))
    if stale:
        warnings.warn(f"scale caches for world size {target_world} already exist ({stale[0].name} ...); they "
                      "predate these measurements: delete them or set recalc_scales", stacklevel=2)
    return written


# ---- step 3 -------------------------------------------------------------------------------------
_O_PROJ_NAMES = ("o_proj", "out_proj", "c_proj")


def postprocess(meas: Measurements) -> list[str]:
    """Step-3 fix-ups, in place: the FP8 K/V read back by matmul_qk / matmul_av use the cache's
    scale, and the fused SDPA output takes o_proj's input maxabs. Layers are found with
    `(^|.)layers.<i>.`, so `language_model.`-prefixed (Llama 4 multimodal) names work too.
    Returns a description of each change."""
    changes = []
    for name in list(meas.nodes):
        if not name.endswith(".k_cache") or not LAYER_RE.search(name):
            continue
        impl = name[: -len(".k_cache")]
        for mm, cache in (("matmul_qk", "k_cache"), ("matmul_av", "v_cache")):
            a, c = meas.nodes.get(f"{impl}.{mm}"), meas.nodes.get(f"{impl}.{cache}")
            if a is not None and c is not None and len(a.inputs) > 1 and c.inputs:
                a.inputs[1] = c.inputs[0]
                changes.append(f"{impl}.{mm}.inputs[1] := {cache}.inputs[0] = {c.inputs[0]}")
        sdpa = meas.nodes.get(f"{impl}.fused_scaled_dot_product_attention")
        attn_parent = impl.rsplit(".", 2)[0] if impl.endswith(".attn.impl") else None
        if sdpa is not None and sdpa.outputs and attn_parent:
            for o in _O_PROJ_NAMES:
                proj = meas.nodes.get(f"{attn_parent}.{o}")
                if proj is not None and proj.inputs:
                    sdpa.outputs[0] = proj.inputs[0]
                    changes.append(f"{impl}.fused_scaled_dot_product_attention.outputs[0] := {o}.inputs[0]")
                    break
    return changes


# ---- coverage -----------------------------------------------------------------------------------
def coverage_report(ranks: list[Measurements], expert_parallel: bool = False) -> dict:
    """Per MoE layer, the experts whose intermediate amax is 0 (never routed to). Under TP every rank
    sees every expert, so an expert is cold only if it is 0 on all ranks; under EP the per-rank lists
    are concatenated into global expert indices."""
    layers = []
    moe_names = list(dict.fromkeys(n for m in ranks for n in m.nodes if _is_moe(n)))
    for moe in moe_names:
        if expert_parallel:
            amax = _global_experts(ranks, moe)
        else:
            amax = _max_lists(moe, "outputs", [m.nodes[moe].outputs for m in ranks if moe in m.nodes])[1:]
        cold = [e for e, a in enumerate(amax) if not a > 0]
        lm = LAYER_RE.search(moe)
        layers.append({"node": moe, "layer": int(lm.group(1)) if lm else None, "num_experts": len(amax),
                       "cold_experts": cold, "min_amax": min(amax) if amax else None,
                       "max_amax": max(amax) if amax else None})
    total = sum(x["num_experts"] for x in layers)
    cold_total = sum(len(x["cold_experts"]) for x in layers)
    return {"num_moe_layers": len(layers), "total_experts": total, "cold_experts": cold_total,
            "all_experts_covered": cold_total == 0, "layers": layers,
            "note": "cold experts get the largest intermediate amax of their layer when scales are computed"}


def format_coverage(report: dict) -> str:
    lines = [f"calibration coverage: {report['total_experts'] - report['cold_experts']}/"
             f"{report['total_experts']} experts received tokens in {report['num_moe_layers']} MoE layers"]
    for layer in report["layers"]:
        if layer["cold_experts"]:
            lines.append(f"  layer {layer['layer']}: {len(layer['cold_experts'])}/{layer['num_experts']} experts "
                         f"got no tokens: {layer['cold_experts']}")
    if report["cold_experts"]:
        lines.append("  (use more / more diverse calibration prompts; cold experts borrow their layer's largest amax)")
    return "\n".join(lines)


def write_coverage_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=4))
    return path
