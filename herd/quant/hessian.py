"""Input second moments of every Linear on calibration text, for GPTQ rounding of FP8 weights.

H = mean over tokens of x x^T, measured on herd's own (unquantized) model with forward hooks.
herd's fused layers share their input, so q/k/v_proj (qkv_proj) and gate/up_proj (gate_up_proj)
map to one tensor under each HF module name. Routed experts are not measured: their weights keep
round-to-nearest (one [in, in] matrix per expert would not fit in memory for Scout or Maverick).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from tqdm import tqdm


class _Moments:
    def __init__(self, dim: int):
        self.sum = torch.zeros(dim, dim, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]


@torch.no_grad()
def measure_hessians(model: torch.nn.Module, sequences: Iterable[Sequence[int]], hf_prefix: str = "",
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """HF module name -> H [in, in] (float32) for every dense Linear of `model` (herd
    Llama4ForCausalLM, single rank), from the token-id `sequences`."""
    from herd.model.layers import LinearBase
    from herd.quant.compressed_tensors.config import checkpoint_ffn_name, herd_to_hf_modules

    if getattr(model, "tp", None) is not None and model.tp.size != 1:
        raise ValueError("Hessian calibration runs on a single rank (tensor_parallel_size 1)")
    moments: dict[str, _Moments] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            acc = moments[name] = _Moments(module.weight.shape[1])
            handles.append(module.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
    device = next(model.parameters()).device
    try:
        for ids in tqdm(list(sequences), desc="hessians", unit="seq", disable=not progress):
            ids = torch.as_tensor(list(ids), dtype=torch.long, device=device)
            if ids.numel():
                model(ids, torch.arange(ids.numel(), device=device))
    finally:
        for h in handles:
            h.remove()
    ffn = checkpoint_ffn_name(getattr(model, "config", None))
    out = {}
    for name, acc in moments.items():
        if acc.count:
            h = acc.sum / acc.count
            for hf_name in herd_to_hf_modules(name, hf_prefix, ffn=ffn):
                out[hf_name] = h
    return out
