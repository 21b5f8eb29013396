"""Which decoder layers lose the most accuracy in FP8: measured one layer at a time.

For each decoder layer, only that layer's quantizable linears are put in FP8 (weights rounded to
the scheme's scales; activations rounded per token, as `--scheme fp8-dynamic` runs them, or, with
`activations="static"`, with one scale per linear from the calibration text's maxabs and INC's
input backoff, as INC's static QUANTIZE runs them; routed experts get FP8 weights only) and the
model's next-token distributions on calibration text are
compared with the original's: the score is the mean KL(original || quantized) per token. The
per-layer scores add up to about the score of the whole model in FP8, so a layer whose score is
far above the median is where a disproportionate part of the loss comes from. `pick_sensitive`
keeps those layers in bf16 (on SmolLM2-135M the last decoder layer scores about 5x the median:
its MLP writes straight into the logits).

Cost, in float32: one forward over the text for the reference, which keeps each decoder layer's
input, then per decoder layer a pass from that layer on (half a forward on average).
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from herd.quant.observers import fake_quantize_fp8, fake_quantize_input, observe_weight_scale

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
SPREAD_FACTOR = 8.0   # a linear's input spread this many times the median linear's: kept in bf16


@dataclass
class LayerScore:
    layer: int
    kl: float                                          # mean KL per token (nats) with only this layer in FP8
    modules: list[str] = field(default_factory=list)   # the checkpoint modules it would quantize
    herd_modules: list[str] = field(default_factory=list)  # the same, as herd's (fused) modules


@dataclass
class InputSpread:
    """How far one linear's largest input (what a static per-tensor scale is set from) is above
    its typical token's largest input: the binades a static scale takes from every other token."""
    module: str                  # herd module name
    hf_modules: list[str]
    amax: float                  # over all scored tokens
    median_token_amax: float     # median over tokens of each token's maxabs

    @property
    def ratio(self) -> float:
        return self.amax / self.median_token_amax if self.median_token_amax > 0 else float("inf")


@dataclass
class Sensitivity:
    scores: list[LayerScore]
    num_tokens: int
    keep: list[int] = field(default_factory=list)      # layers chosen to stay in bf16
    factor: float = 0.0
    text: str = "calibration text"                      # what the tokens were
    spreads: list[InputSpread] = field(default_factory=list)   # static activations only
    keep_linears: list[InputSpread] = field(default_factory=list)  # single linears kept in bf16

    @property
    def median(self) -> float:
        return statistics.median(s.kl for s in self.scores) if self.scores else 0.0

    @property
    def median_spread(self) -> float:
        return statistics.median(x.ratio for x in self.spreads) if self.spreads else 0.0

    @property
    def total(self) -> float:
        return sum(s.kl for s in self.scores)

    def kept_modules(self, herd_names: bool = False) -> list[str]:
        by_layer = {s.layer: s for s in self.scores}
        out = [m for i in self.keep for m in (by_layer[i].herd_modules if herd_names else by_layer[i].modules)]
        for sp in self.keep_linears:
            out += [sp.module] if herd_names else sp.hf_modules
        return out

    def linear_reason(self, sp: InputSpread) -> str:
        return (f"{sp.module}: its largest input ({sp.amax:.4g}) is {sp.ratio:.0f}x its median token's "
                f"({sp.median_token_amax:.4g}), {sp.ratio / self.median_spread:.0f}x the median linear's "
                f"spread: a static per-tensor scale would leave the other tokens' inputs with few FP8 bits")

    def reason(self, layer: int) -> str:
        s = next(s for s in self.scores if s.layer == layer)
        med = self.median
        ratio = f"{s.kl / med:.1f}x the median layer" if med > 0 else "the median layer scores 0"
        share = f", {100 * s.kl / self.total:.0f}% of the sum over layers" if self.total > 0 else ""
        return (f"decoder layer {layer}: FP8 in this layer alone costs KL {1000 * s.kl:.2f} mnat/token on "
                f"{self.num_tokens} tokens of {self.text}, {ratio}{share}")

    def format(self) -> str:
        if not self.scores:
            return "sensitivity: no decoder layer has quantizable linears"
        rule = (f"keep layers above {self.factor:g}x the median" if self.factor
                else f"keep the {len(self.keep)} highest")
        lines = [f"per-layer FP8 sensitivity ({self.num_tokens} tokens of {self.text}; KL mnat/token, median "
                 f"{1000 * self.median:.3f}; rule: {rule})"]
        for s in sorted(self.scores, key=lambda s: -s.kl)[:5]:
            mark = "  kept in bf16" if s.layer in self.keep else ""
            lines.append(f"  layer {s.layer:3d}  {1000 * s.kl:8.3f}{mark}")
        if not self.keep:
            lines.append("  no layer stands out: all stay in FP8")
        if self.spreads:
            top = sorted(self.spreads, key=lambda x: -x.ratio)[:3]
            lines.append("static input spread (largest input / median token's), highest: " +
                         ", ".join(f"{x.module} {x.ratio:.0f}x" for x in top) +
                         f"; median {self.median_spread:.1f}x")
        return "\n".join(lines)


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class _InputAmax:
    """Context: records the maxabs of every given linear's input over the passes it is open for
    (what INC's MEASURE step writes for the node)."""

    def __init__(self, linears):
        self.token_amax = {mod: [] for mod in linears}   # each token's maxabs, per pass
        self.hooks = []

    def _hook(self, mod, args):
        self.token_amax[mod].append(args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=-1).float().cpu())

    def amax(self, mod) -> torch.Tensor:
        return torch.cat(self.token_amax[mod]).max() if self.token_amax[mod] else torch.zeros(())

    def median_token_amax(self, mod) -> float:
        return float(torch.cat(self.token_amax[mod]).median()) if self.token_amax[mod] else 0.0

    def __enter__(self):
        self.hooks = [mod.register_forward_pre_hook(self._hook) for mod in self.token_amax]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


class _LayerInFp8:
    """Context: the given modules of one decoder layer run with FP8-rounded weights and inputs
    (per token, or with the fixed per-tensor scales of `input_scales`)."""

    def __init__(self, linears, experts, strategy: str, observer: str, input_scales: dict | None = None):
        self.linears, self.experts = linears, experts
        self.strategy, self.observer = strategy, observer
        self.input_scales = input_scales
        self.saved, self.hooks = [], []

    def _round(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_fp8(w, observe_weight_scale(w, self.strategy, self.observer))

    def __enter__(self):
        for mod in self.linears:
            self.saved.append((mod, "weight", mod.weight.data))
            mod.weight.data = self._round(mod.weight.data)
            if self.input_scales is None:
                hook = lambda m, args: (fake_quantize_input(args[0]),) + tuple(args[1:])  # noqa: E731
            else:
                scale = self.input_scales[mod]
                hook = lambda m, args, s=scale: (fake_quantize_input(args[0], s),) + tuple(args[1:])  # noqa: E731
            self.hooks.append(mod.register_forward_pre_hook(hook))
        for moe in self.experts:
            for attr in ("w13_weight", "w2_weight"):
                w = getattr(moe, attr).data
                self.saved.append((moe, attr, w))
                getattr(moe, attr).data = torch.stack([self._round(w[e]) for e in range(w.shape[0])])
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        for mod, attr, w in self.saved:
            getattr(mod, attr).data = w


class _Passes:
    """Forward passes over the scored sequences. The reference pass keeps every decoder layer's
    input, so a pass with only layer i in FP8 starts at layer i: the layers before it would compute
    exactly what they computed for the reference (halves the cost of scoring every layer)."""

    def __init__(self, model, sequences: list[torch.Tensor]):
        self.model, self.seqs = model, sequences
        inner = getattr(model, "model", None)
        ok = all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm"))
        self.decoder = inner if ok else None
        self.states: list[list[torch.Tensor]] = [[] for _ in sequences]

    @torch.no_grad()
    def logprobs(self, start: int = 0, record: bool = False) -> list[torch.Tensor]:
        """From decoder layer `start` on (a model without the decoder attributes runs whole);
        `record`: this is the reference pass, keep each layer's input."""
        out = []
        for k, ids in enumerate(self.seqs):
            pos = torch.arange(ids.numel(), device=ids.device)
            if self.decoder is None:
                h = self.model(ids, pos)
            else:
                layers = self.decoder.layers
                h = self.states[k][start] if start else self.decoder.embed_tokens(ids)
                for j in range(start, len(layers)):
                    if record:
                        self.states[k].append(h)
                    h = layers[j](pos, h, None)
                h = self.decoder.norm(h)
            out.append(torch.log_softmax(self.model.compute_logits(h).float()[:-1], dim=-1))
        return out


@torch.no_grad()
def measure_layer_sensitivity(
    model: torch.nn.Module,
    sequences: Iterable[Sequence[int]],
    is_quantized: Callable[[str], bool],
    hf_prefix: str = "",
    strategy: str = "channel",
    observer: str = "minmax",
    activations: str = "dynamic",
    input_backoff: float = 0.25,
    progress: bool = False,
) -> Sensitivity:
    """Score every decoder layer of `model` (herd Llama4ForCausalLM, unquantized, single rank).
    `is_quantized(hf_module_name)` says whether the recipe puts a checkpoint module in FP8; a fused
    herd module counts when all of its parts are quantized. `activations`: "dynamic" (per token) or
    "static" (per linear: maxabs over the same text / (448 * input_backoff))."""
    if activations not in ("dynamic", "static"):
        raise ValueError(f"activations must be 'dynamic' or 'static', got {activations!r}")
    from herd.model.layers import LinearBase
    from herd.model.llama4 import FusedMoE
    from herd.quant.compressed_tensors.config import checkpoint_ffn_name, herd_to_hf_modules

    device = next(model.parameters()).device
    seqs = [torch.as_tensor(list(s), dtype=torch.long, device=device) for s in sequences]
    seqs = [s for s in seqs if s.numel() > 1]
    if not seqs:
        raise ValueError("sensitivity needs at least one calibration sequence of 2 or more tokens")
    ffn = checkpoint_ffn_name(getattr(model, "config", None))
    per_layer: dict[int, tuple[list, list, list[str], list[str]]] = {}
    for name, mod in model.named_modules():
        layer = layer_of(name)
        if layer is None:
            continue
        if isinstance(mod, LinearBase):
            hf = herd_to_hf_modules(name, hf_prefix, ffn=ffn)
            if hf and all(is_quantized(n) for n in hf):
                entry = per_layer.setdefault(layer, ([], [], [], []))
                entry[0].append(mod)
                entry[2].extend(hf)
                entry[3].append(name)
        elif isinstance(mod, FusedMoE):
            hf = herd_to_hf_modules(name, hf_prefix, num_experts=mod.num_local_experts, ffn=ffn)
            if all(is_quantized(n) for n in hf):
                entry = per_layer.setdefault(layer, ([], [], [], []))
                entry[1].append(mod)
                entry[2].extend(hf)
                entry[3].append(name)
    passes = _Passes(model, seqs)
    input_scales, spreads = None, []
    if activations == "static":
        with _InputAmax([m for entry in per_layer.values() for m in entry[0]]) as seen:
            reference = passes.logprobs(record=True)
        amax = {m: seen.amax(m) for m in seen.token_amax}
        input_scales = {m: (a / (448.0 * input_backoff)).clamp(min=1e-12) for m, a in amax.items()}
        names = {mod: name for name, mod in model.named_modules()}
        for mod, a in amax.items():
            hf = herd_to_hf_modules(names[mod], hf_prefix, ffn=ffn)
            spreads.append(InputSpread(names[mod], hf, float(a), seen.median_token_amax(mod)))
    else:
        reference = passes.logprobs(record=True)
    num_tokens = sum(r.shape[0] for r in reference)
    scores = []
    for layer in tqdm(sorted(per_layer), desc="fp8 sensitivity", unit="layer", disable=not progress):
        linears, experts, modules, herd_modules = per_layer[layer]
        with _LayerInFp8(linears, experts, strategy, observer, input_scales):
            quant = passes.logprobs(start=layer)
        kl = sum(float((r.exp() * (r - q)).sum()) for r, q in zip(reference, quant)) / num_tokens
        scores.append(LayerScore(layer, max(kl, 0.0), modules, herd_modules))
    return Sensitivity(scores, num_tokens, spreads=spreads)


def pick_sensitive(sens: Sensitivity, factor: float = 3.0, max_layers: int | None = None,
                   spread_factor: float = SPREAD_FACTOR) -> Sensitivity:
    """Keep in bf16 the layers scoring above `factor` x the median layer, at most `max_layers`
    (default: a tenth of the scored layers, rounded down), highest first. With static activations,
    also every single linear outside those layers whose input spread is above `spread_factor` x
    the median linear's: one rare huge input (SmolLM2's BOS token gives layer 11's down_proj 3,072
    against 10.6 for every other token) costs that linear 3-4x the static-scale error of the rest,
    which a whole-layer score dilutes among the layer's other linears."""
    if max_layers is None:
        max_layers = len(sens.scores) // 10
    med = sens.median
    ranked = sorted(sens.scores, key=lambda s: -s.kl)
    sens.keep = [s.layer for s in ranked if med > 0 and s.kl > factor * med][:max_layers]
    sens.factor = factor
    sens.keep_linears = []
    if sens.spreads:
        sens.keep_linears = [x for x in sorted(sens.spreads, key=lambda x: -x.ratio)
                             if x.ratio > spread_factor * sens.median_spread and layer_of(x.module) not in sens.keep
                             ][:max(1, max_layers)]
    return sens


def keep_top(sens: Sensitivity, n: int) -> Sensitivity:
    """Keep the `n` highest-scoring layers, whatever their scores."""
    sens.keep = [s.layer for s in sorted(sens.scores, key=lambda s: -s.kl)[:max(n, 0)]]
    sens.factor = 0.0
    return sens
