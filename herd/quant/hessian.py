"""Input second moments of every Linear on calibration text, for GPTQ rounding of FP8 weights.

H = mean over tokens of x x^T, measured on herd's own (unquantized) model with forward hooks.
herd's fused layers share their input, so q/k/v_proj (qkv_proj) and gate/up_proj (gate_up_proj)
map to one tensor under each HF module name. Routed experts are not measured: their weights keep
round-to-nearest (one [in, in] matrix per expert would not fit in memory for Scout or Maverick).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

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


# ---- sequential: each layer's inputs come from the layers before it, already in FP8 ---------------

def _part_rows(module) -> list[int]:
    """Output rows of each checkpoint module behind a herd Linear, in herd_to_hf_modules' order."""
    from herd.model.layers import MergedColumnParallelLinear, QKVParallelLinear

    if isinstance(module, MergedColumnParallelLinear):
        return list(module.out_sizes_local)
    if isinstance(module, QKVParallelLinear):
        q, kv = module.num_heads * module.head_dim, module.num_kv_heads * module.head_dim
        return [q, kv, kv]
    return [module.out_local]


@torch.no_grad()
def measure_hessians_sequential(
    model: torch.nn.Module,
    sequences: Iterable[Sequence[int]],
    round_weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    wanted: Callable[[str], bool],
    hf_prefix: str = "",
    activations: str = "dynamic",
    input_backoff: float = 0.25,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Like `measure_hessians`, but one decoder layer at a time, each measured on the hidden states
    that the layers before it give once they are in FP8 (as llm-compressor's sequential pipeline
    does): GPTQ then also compensates the drift those layers' rounding causes, instead of
    optimising every layer for inputs the quantized model never sees.

    For each layer: its Linears' H from the incoming states; then its FP8 Linears
    (`wanted(hf_name)` for every checkpoint module behind one) get `round_weight(w, H)` (the
    fake-quantized weight the export will write, one checkpoint module's rows at a time) and FP8
    inputs (per token for `activations="dynamic"`, or a static scale maxabs / (448 * input_backoff)
    from these states), and the states go through it. Routed experts keep full precision here, as
    they get no Hessian. The model's weights are restored before returning."""
    from herd.model.layers import LinearBase
    from herd.quant.compressed_tensors.config import checkpoint_ffn_name, herd_to_hf_modules
    from herd.quant.observers import fake_quantize_input

    if activations not in ("dynamic", "static"):
        raise ValueError(f"activations must be 'dynamic' or 'static', got {activations!r}")
    if getattr(model, "tp", None) is not None and model.tp.size != 1:
        raise ValueError("Hessian calibration runs on a single rank (tensor_parallel_size 1)")
    ffn = checkpoint_ffn_name(getattr(model, "config", None))
    device = next(model.parameters()).device
    seqs = [torch.as_tensor(list(s), dtype=torch.long, device=device) for s in sequences]
    seqs = [s for s in seqs if s.numel()]
    positions = [torch.arange(s.numel(), device=device) for s in seqs]
    names = {m: n for n, m in model.named_modules()}
    states = [model.model.embed_tokens(s) for s in seqs]
    out: dict[str, torch.Tensor] = {}
    saved: list[tuple[torch.nn.Module, torch.Tensor]] = []
    try:
        for layer in tqdm(model.model.layers, desc="hessians (sequential)", unit="layer", disable=not progress):
            linears = {}
            for mod in layer.modules():
                if isinstance(mod, LinearBase):
                    linears[mod] = (herd_to_hf_modules(names[mod], hf_prefix, ffn=ffn), _Moments(mod.weight.shape[1]), [])

            def record(mod, args):
                _, acc, amax = linears[mod]
                acc.add(args[0])
                amax.append(args[0].detach().abs().amax().float())

            hooks = [mod.register_forward_pre_hook(record) for mod in linears]
            try:
                for p, h in zip(positions, states):
                    layer(p, h, None)
            finally:
                for hook in hooks:
                    hook.remove()
            hooks = []
            for mod, (hf_names, acc, amax) in linears.items():
                if not acc.count:
                    continue
                H = acc.sum / acc.count
                for n in hf_names:
                    out[n] = H
                if not hf_names or not all(wanted(n) for n in hf_names):
                    continue
                w = mod.weight.data
                rows = torch.split(w.float(), _part_rows(mod), dim=0)
                new = torch.empty_like(w)
                new.copy_(torch.cat([round_weight(r, H) for r in rows]).to(w.dtype))
                saved.append((mod, w))
                mod.weight.data = new
                scale = (None if activations == "dynamic"
                         else (torch.stack(amax).max() / (448.0 * input_backoff)).clamp(min=1e-12))
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, args, s=scale: (fake_quantize_input(args[0], s),) + tuple(args[1:])))
            try:
                states = [layer(p, h, None) for p, h in zip(positions, states)]
            finally:
                for hook in hooks:
                    hook.remove()
    finally:
        for mod, w in saved:
            mod.weight.data = w
    return out
