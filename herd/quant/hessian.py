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
    targets: dict[str, torch.Tensor] | None = None,
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
    they get no Hessian. The model's weights are restored before returning.

    `targets` (a dict to fill) asks for the asymmetric form: the unquantized model's states run
    alongside, and each FP8 Linear's target is its original output W x on them instead of W x~ on
    the quantized states x~. The least-squares weight for that target,
    W* = W + W (C - H) (H + damp)^-1 with C = E[x (fq x~)^T] and H = E[fq x~ (fq x~)^T] (fq: the
    linear's own FP8 input rounding), goes into `targets` per checkpoint module; GPTQ then rounds W*
    under H, which splits the error exactly into the part W* cannot undo and its rounding's.
    H is then measured on the FP8-rounded inputs."""
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
    fp_states = list(states)                  # the unquantized model's, for the asymmetric form
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

            cross = None
            if targets is None:
                hooks = [mod.register_forward_pre_hook(record) for mod in linears]
                try:
                    for p, h in zip(positions, states):
                        layer(p, h, None)
                finally:
                    for hook in hooks:
                        hook.remove()
            else:
                cross, fp_states = _measure_asymmetric(layer, linears, positions, fp_states, states,
                                                       activations, input_backoff)
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
                if cross is not None:
                    rows = torch.split(least_squares_weight(w.float(), cross[mod] / acc.count, H),
                                       _part_rows(mod), dim=0)
                    targets.update(zip(hf_names, rows))
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


def least_squares_weight(w: torch.Tensor, cross: torch.Tensor, hessian: torch.Tensor,
                         damp: float = 0.01) -> torch.Tensor:
    """argmin_V E||W x - V x~||^2 for `w` [out, in], `cross` = E[x x~^T] and `hessian` = E[x~ x~^T],
    as W + W (C - H) (H + damp * mean(diag H) I)^-1: exactly W when x~ = x, and the damping (as
    GPTQ's) only shrinks the correction."""
    H = hessian.double()
    n = H.shape[0]
    L = torch.linalg.cholesky(H + damp * torch.diag(H).mean().clamp(min=1e-20) * torch.eye(n, dtype=H.dtype))
    delta = torch.cholesky_solve((cross.double() - H).T, L).T   # (C - H) (H + damp)^-1
    return (w.double() + w.double() @ delta).to(w.dtype)


def _measure_asymmetric(layer, linears, positions, fp_states, states, activations: str, input_backoff: float):
    """One decoder layer's moments for the asymmetric form: H = E[fq x~ (fq x~)^T] into each
    linear's accumulator and C = E[x (fq x~)^T] (returned per module), pairing each linear's input
    on the unquantized states x with the same tokens' x~ on the quantized ones. Returns C and the
    unquantized states after the layer."""
    from herd.quant.observers import fake_quantize_input

    scales: dict = {}
    if activations == "static":  # the scale fq uses is the maxabs over all tokens: one pass first
        hooks = [mod.register_forward_pre_hook(
            lambda m, args: linears[m][2].append(args[0].detach().abs().amax().float())) for mod in linears]
        try:
            for p, h in zip(positions, states):
                layer(p, h, None)
        finally:
            for hook in hooks:
                hook.remove()
        scales = {m: (torch.stack(a).max() / (448.0 * input_backoff)).clamp(min=1e-12)
                  for m, (_, _, a) in linears.items() if a}
    cross = {m: torch.zeros(m.weight.shape[1], m.weight.shape[1]) for m in linears}
    stash: dict = {}
    side = {"fp": True}

    def record(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
        if side["fp"]:
            stash[mod] = x
            return
        xq = fake_quantize_input(x, scales.get(mod))
        linears[mod][1].add(xq)
        cross[mod].addmm_(stash.pop(mod).T, xq)

    hooks = [mod.register_forward_pre_hook(record) for mod in linears]
    new_fp = []
    try:
        for p, h_fp, h in zip(positions, fp_states, states):
            side["fp"] = True
            new_fp.append(layer(p, h_fp, None))
            side["fp"] = False
            layer(p, h, None)
    finally:
        for hook in hooks:
            hook.remove()
    return cross, new_fp
