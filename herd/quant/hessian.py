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

    `targets` (a dict to fill): asymmetric calibration. The unquantized model runs alongside, and
    each FP8 Linear's weight is first refitted to give the unquantized model's output from the
    input the FP8 model gives it, FP8-quantized: W' = (W C + d W)(Hq + d I)^-1 with C = mean x xq^T
    (x the unquantized model's input, xq the FP8 model's after its FP8 quantization),
    Hq = mean xq xq^T, and a small damping d that pulls W' towards W (W' = W when xq = x). As W' is
    that least-squares fit, |W x - Q xq|^2 = |W x - W' xq|^2 + |(W' - Q) xq|^2 (undamped), so GPTQ
    rounding W' under Hq minimises the error against the unquantized model's output: it absorbs
    the drift of the FP8 layers before it and the systematic part of the input's own FP8 error.
    The layer's FP8 Linears are then measured one at a time in execution order, each behind the ones
    before it already in FP8 (refitted, rounded, FP8 inputs), so that down_proj does not correct
    again the drift its gate_up_proj's refit removed. `targets` gets W' per checkpoint module (what
    to round and write); the returned Hessians are Hq, for the FP8 Linears only."""
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
    reference = list(states) if targets is not None else None   # the unquantized model's states
    out: dict[str, torch.Tensor] = {}
    saved: list[tuple[torch.nn.Module, torch.Tensor]] = []
    try:
        for layer in tqdm(model.model.layers, desc="hessians (sequential)", unit="layer", disable=not progress):
            linears = {}
            for mod in layer.modules():   # in execution order: qkv, o, gate_up, down
                if isinstance(mod, LinearBase):
                    hf_names = herd_to_hf_modules(names[mod], hf_prefix, ffn=ffn)
                    fp8 = bool(hf_names) and all(wanted(n) for n in hf_names)
                    linears[mod] = _Inputs(hf_names, mod.weight.shape[1], fp8, keep=reference is not None and fp8)
            hooks: list = []

            def run(record: dict) -> None:   # the FP8 model's states through the layer, FP8 so far
                with _Hooked(record, lambda st, x: st.record(x)):
                    for p, h in zip(positions, states):
                        layer(p, h, None)

            def quantize(mod, st: _Inputs) -> None:
                scale = (None if activations == "dynamic"
                         else (torch.stack(st.amax).max() / (448.0 * input_backoff)).clamp(min=1e-12))
                H = st.moments.sum / st.moments.count
                w = mod.weight.data.float()
                if st.keep:
                    w, H = _refit(w, st, scale)
                    st.inputs.clear()
                    st.reference.clear()
                for n in st.hf_names:
                    out[n] = H
                if not st.fp8:
                    return
                rows = torch.split(w, _part_rows(mod), dim=0)
                if targets is not None:
                    targets.update(zip(st.hf_names, (r.clone() for r in rows)))
                new = torch.empty_like(mod.weight.data)
                new.copy_(torch.cat([round_weight(r, H) for r in rows]).to(new.dtype))
                saved.append((mod, mod.weight.data))
                mod.weight.data = new
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, args, s=scale: (fake_quantize_input(args[0], s),) + tuple(args[1:])))

            try:
                if reference is None:   # all of the layer's Hessians from one pass, the layer unquantized
                    run(linears)
                    for mod, st in linears.items():
                        if st.moments.count:
                            quantize(mod, st)
                else:
                    # asymmetric: one Linear at a time, each measured behind the ones before it in
                    # FP8 already, or a refit would correct again what the one before it corrected
                    with _Hooked(linears, lambda st, x: st.reference.append(x.detach().float()) if st.keep else None):
                        reference = [layer(p, h, None) for p, h in zip(positions, reference)]
                    for mod, st in linears.items():
                        if st.keep:
                            run({mod: st})
                            if st.moments.count:
                                quantize(mod, st)
                states = [layer(p, h, None) for p, h in zip(positions, states)]
            finally:
                for hook in hooks:
                    hook.remove()
    finally:
        for mod, w in saved:
            mod.weight.data = w
    return out


class _Inputs:
    """What one Linear of the layer being calibrated saw: input moments and maxabs, and for the
    asymmetric refit its inputs per sequence on the FP8 model's and the unquantized model's states."""

    def __init__(self, hf_names: list[str], dim: int, fp8: bool, keep: bool):
        self.hf_names, self.fp8, self.keep = hf_names, fp8, keep
        self.moments, self.amax = _Moments(dim), []
        self.inputs: list[torch.Tensor] = []
        self.reference: list[torch.Tensor] = []

    def record(self, x: torch.Tensor) -> None:
        self.moments.add(x)
        self.amax.append(x.detach().abs().amax().float())
        if self.keep:
            self.inputs.append(x.detach().float())


class _Hooked:
    """Forward pre-hooks calling fn(inputs, x) for every Linear of `linears` while inside."""

    def __init__(self, linears: dict, fn):
        self.linears, self.fn, self.handles = linears, fn, []

    def __enter__(self):
        self.handles = [mod.register_forward_pre_hook(lambda m, args, st=st: self.fn(st, args[0]))
                        for mod, st in self.linears.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _refit(w: torch.Tensor, st: _Inputs, scale: torch.Tensor | None,
           damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', Hq) of the asymmetric refit (see measure_hessians_sequential), solved in float64."""
    from herd.quant.observers import fake_quantize_input

    n = w.shape[1]
    C = torch.zeros(n, n, dtype=torch.float64)
    Hq = torch.zeros(n, n, dtype=torch.float64)
    count = 0
    for x, xr in zip(st.inputs, st.reference):
        xq = fake_quantize_input(x.reshape(-1, n), scale).double()
        C.addmm_(xr.reshape(-1, n).double().T, xq)
        Hq.addmm_(xq.T, xq)
        count += xq.shape[0]
    C, Hq = C / count, Hq / count
    d = damp * torch.diag(Hq).mean().clamp(min=1e-12)
    W = w.double()
    # W' (Hq + d I) = W C + d W, with Hq + d I symmetric positive definite
    refit = torch.linalg.solve(Hq + d * torch.eye(n, dtype=torch.float64), (W @ C + d * W).T).T
    return refit.float(), Hq.float()
