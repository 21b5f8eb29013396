"""Llama 4 routed experts: HF's fused 3-D parameters <-> per-expert [out, in] Linear weights.

HF bf16 checkpoints store, per MoE layer (no `.weight` suffix, [in, out] layout):
  ...feed_forward.experts.gate_up_proj  [E, D, 2I]   gate = [..., :I], up = [..., I:]
  ...feed_forward.experts.down_proj     [E, I, D]
compressed-tensors checkpoints (llm-compressor turns the experts into nn.Linear before quantizing)
store one Linear per expert in [out, in] layout:
  ...feed_forward.experts.{e}.gate_proj.weight = gate_up_proj[e][:, :I].T   [I, D]
  ...feed_forward.experts.{e}.up_proj.weight   = gate_up_proj[e][:, I:].T   [I, D]
  ...feed_forward.experts.{e}.down_proj.weight = down_proj[e].T             [D, I]
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

PER_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<param>\w+)$"
)


def fused_expert_param(name: str) -> tuple[str, str] | None:
    """('...experts', 'gate_up_proj' | 'down_proj') for a fused HF expert tensor name, else None."""
    for kind in ("gate_up_proj", "down_proj"):
        if name.endswith(".experts." + kind):
            return name[: -len(kind) - 1], kind
    return None


def expert_module_names(experts_prefix: str, kind: str, expert: int) -> list[str]:
    """HF per-expert module names produced from one expert of a fused tensor."""
    projs = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    return [f"{experts_prefix}.{expert}.{p}" for p in projs]


def split_expert(kind: str, fused_e: torch.Tensor) -> list[torch.Tensor]:
    """One expert's slice of a fused tensor -> its [out, in] weights (gate, up) or (down,)."""
    if fused_e.dim() != 2:
        raise ValueError(f"expected one expert's 2-D slice, got shape {tuple(fused_e.shape)}")
    if kind == "gate_up_proj":
        if fused_e.shape[1] % 2:
            raise ValueError(f"gate_up_proj last dim {fused_e.shape[1]} is not even")
        gate, up = fused_e.chunk(2, dim=1)
        return [gate.t().contiguous(), up.t().contiguous()]
    if kind == "down_proj":
        return [fused_e.t().contiguous()]
    raise ValueError(f"unknown fused expert tensor {kind!r}")


def split_fused_experts(name: str, fused: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, [out, in] weight) for every expert of a fused HF tensor `name`."""
    parsed = fused_expert_param(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a fused Llama 4 expert tensor")
    prefix, kind = parsed
    for e in range(fused.shape[0]):
        yield from zip(expert_module_names(prefix, kind, e), split_expert(kind, fused[e]))


def fuse_expert_tensors(
    named: Iterable[tuple[str, torch.Tensor]], num_experts: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of the split for (dequantized) `.weight` tensors: rebuilds HF's fused
    `experts.gate_up_proj` [E, D, 2I] and `experts.down_proj` [E, I, D]; other tensors pass through.
    With `num_experts` a layer is emitted as soon as it is complete, else everything at the end."""
    pending: dict[str, dict[tuple[str, int], torch.Tensor]] = {}

    def fused(prefix: str, parts: dict[tuple[str, int], torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        n = 1 + max(e for _, e in parts)
        missing = [(p, e) for p in ("gate_proj", "up_proj", "down_proj") for e in range(n) if (p, e) not in parts]
        if missing:
            raise ValueError(f"{prefix}: missing per-expert weights {missing[:4]}")
        gate_up = torch.stack(
            [torch.cat([parts["gate_proj", e].t(), parts["up_proj", e].t()], dim=1) for e in range(n)])
        down = torch.stack([parts["down_proj", e].t() for e in range(n)])
        return [(prefix + ".gate_up_proj", gate_up), (prefix + ".down_proj", down)]

    for name, t in named:
        m = PER_EXPERT_RE.match(name)
        if m is None:
            yield name, t
            continue
        if m["param"] != "weight":
            raise ValueError(f"fuse_expert_tensors takes dequantized weights only, got {name!r}")
        parts = pending.setdefault(m["prefix"], {})
        parts[m["proj"], int(m["expert"])] = t
        if num_experts is not None and len(parts) == 3 * num_experts:
            yield from fused(m["prefix"], pending.pop(m["prefix"]))
    for prefix, parts in pending.items():
        yield from fused(prefix, parts)
