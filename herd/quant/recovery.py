"""FP8 accuracy options of `herd quantize` and `herd calibrate`: keep the most sensitive decoder
layers in bf16 (`--bf16-layers`, measured by herd.quant.sensitivity) and round FP8 weights with
GPTQ (`--rounding gptq`, from calibration Hessians, herd.quant.hessian).

Both need the model in memory in float32 on the CPU (or `--device`), like the accuracy report. The
automatic choice (`--bf16-layers auto`, the default) is measured only for checkpoints up to
AUTO_MAX_BYTES; larger ones keep the recipe's ignore list unless a number is given.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch

from herd.quant.sensitivity import Sensitivity, keep_top, measure_layer_sensitivity, pick_sensitive

AUTO_MAX_BYTES = 4 * 10**9        # checkpoint size up to which `auto` measures
AUTO_MIN_LAYERS = 10              # auto keeps at most a tenth of the decoder layers
SENSITIVITY_TOKENS = 2048         # calibration tokens scored per layer
DEFAULT_FACTOR = 3.0              # auto: layers above this multiple of the median layer stay bf16


def parse_bf16_layers(text: str) -> str | int:
    text = text.strip().lower()
    if text in ("auto", "none"):
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bf16-layers takes auto, none or a number, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("--bf16-layers must be >= 0")
    return n


def add_bf16_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bf16-layers", type=parse_bf16_layers, default="auto", metavar="auto|none|N",
                        help="decoder layers kept in bf16 by measured FP8 sensitivity: auto (default) keeps "
                             f"the layers scoring above {DEFAULT_FACTOR:g}x the median layer (at most a tenth "
                             f"of them; measured for checkpoints up to {AUTO_MAX_BYTES // 10**9} GB with "
                             f"{AUTO_MIN_LAYERS}+ layers), N keeps the N most sensitive, none keeps only the "
                             "recipe's list")


def add_gptq_inputs_argument(parser: argparse.ArgumentParser, default: str, why: str,
                             choices: tuple[str, ...] = ("original", "quantized")) -> None:
    extra = (", or asymmetric (quantized, and each FP8 weight first refitted by least squares to give the "
             "unquantized model's output from the FP8 model's FP8 inputs; its Hessians take about 1.2x quantized's time)"
             if "asymmetric" in choices else "")
    parser.add_argument("--gptq-inputs", choices=choices, default=default,
                        help="inputs GPTQ's Hessians are measured on: original (the unquantized model's, all layers "
                             "in one pass) or quantized (one decoder layer at a time, on the states of the layers "
                             f"before it in FP8, as llm-compressor's sequential pipeline; 3-4x the time){extra}; "
                             f"default {default}: {why} (docs/eval.md)")


@dataclass
class RecoveryPlan:
    sensitivity: Sensitivity | None = None
    hessians: dict[str, torch.Tensor] | None = None
    note: str = ""                                   # why nothing was measured, if so
    text: str = ""                                   # what the measurement ran on
    hf_config: object = None                         # herd's config of the measured model

    def kept_modules(self, herd_names: bool = False) -> list[str]:
        return self.sensitivity.kept_modules(herd_names) if self.sensitivity else []

    def reasons(self) -> dict[str, str]:
        """Checkpoint module -> why it stays bf16."""
        if not self.sensitivity:
            return {}
        by_layer = {s.layer: s for s in self.sensitivity.scores}
        out = {m: self.sensitivity.reason(i) for i in self.sensitivity.keep for m in by_layer[i].modules}
        for sp in self.sensitivity.keep_linears:
            out.update({m: self.sensitivity.linear_reason(sp) for m in sp.hf_modules})
        return out

    def format(self) -> str:
        lines = []
        if self.sensitivity is not None:
            lines.append(self.sensitivity.format())
            for i in self.sensitivity.keep:
                lines.append(f"kept in bf16: {self.sensitivity.reason(i)}")
            for sp in self.sensitivity.keep_linears:
                lines.append(f"kept in bf16: {self.sensitivity.linear_reason(sp)}")
        if self.note:
            lines.append(self.note)
        if self.hessians is not None:
            lines.append(f"GPTQ rounding for {len(self.hessians)} Linear modules ({self.text})")
        return "\n".join(lines)


def _config(model_path: str) -> dict:
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def num_decoder_layers(model_path: str) -> int:
    cfg = _config(model_path)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    return int(text.get("num_hidden_layers", 0))


def checkpoint_bytes(model_path: str) -> int:
    return sum(os.path.getsize(os.path.join(model_path, f)) for f in os.listdir(model_path)
               if f.endswith(".safetensors"))


def _limit_tokens(sequences: list[list[int]], limit: int) -> list[list[int]]:
    out, total = [], 0
    for s in sequences:
        if total >= limit:
            break
        out.append(list(s)[: limit - total])
        total += len(out[-1])
    return out


def default_sequences(model_path: str) -> list[list[int]]:
    """The report's built-in passage, when no calibration text is given."""
    from herd.engine.tokenizer import get_tokenizer
    from herd.quant.accuracy_report import DEFAULT_TEXTS

    tok = get_tokenizer(model_path)
    return [tok.encode(t) for t in DEFAULT_TEXTS]


def plan(model_path: str, is_quantized: Callable[[str], bool], bf16_layers: str | int,
         sequences: list[list[int]] | None, text: str, gptq: bool = False, strategy: str = "channel",
         observer: str = "minmax", device: str = "cpu", progress: bool = True,
         activations: str = "dynamic", input_backoff: float = 0.25, sequential: bool = False,
         weight_observer: str = "mse", static_inputs: bool = False) -> RecoveryPlan:
    """Measure what is asked: per-layer sensitivity (unless `bf16_layers` is "none" or 0, or "auto"
    on a large checkpoint) and, with `gptq`, the Hessians (`sequences` required). `sequential`: each
    layer's Hessians on the states of the layers before it in FP8 (their weights rounded as the
    export will, with `strategy` / `weight_observer` scales; inputs per token, or with
    `static_inputs` one scale amax / 448 per linear, as compressed-tensors' static scheme)."""
    from herd.model.loader import load_model

    out = RecoveryPlan(text=text)
    if not _config(model_path) or _config(model_path).get("quantization_config"):
        return out  # nothing to measure: the export itself reports the error
    measure = bf16_layers not in ("none", 0)
    if bf16_layers == "auto" and num_decoder_layers(model_path) < AUTO_MIN_LAYERS:
        measure = False  # a tenth of the layers is none: nothing to measure
    elif bf16_layers == "auto" and checkpoint_bytes(model_path) > AUTO_MAX_BYTES:
        measure = False
        out.note = (f"bf16 layers: not measured (checkpoint over {AUTO_MAX_BYTES // 10**9} GB); "
                    "--bf16-layers N measures and keeps the N most sensitive layers")
    if gptq and not sequences:
        raise ValueError("--rounding gptq needs calibration text (--calib-data FILE)")
    if not measure and not gptq:
        return out
    model = load_model(model_path, dtype=torch.float32, device=device)
    hf_prefix = "language_model." if getattr(model.config, "multimodal", False) else ""
    out.hf_config = model.config
    try:
        if measure:
            seqs = _limit_tokens(sequences or default_sequences(model_path), SENSITIVITY_TOKENS)
            sens = measure_layer_sensitivity(model, seqs, is_quantized, hf_prefix, strategy, observer,
                                             activations, input_backoff, progress)
            sens.text = text
            out.sensitivity = (pick_sensitive(sens, DEFAULT_FACTOR) if bf16_layers == "auto"
                               else keep_top(sens, int(bf16_layers)))
        if gptq:
            from herd.quant.hessian import measure_hessians, measure_hessians_sequential
            from herd.quant.observers import dequantize_fp8, quantize_weight

            kept = set(out.kept_modules())
            wanted = lambda n: is_quantized(n) and n not in kept  # noqa: E731
            if sequential:
                rounded = lambda w, h: dequantize_fp8(*quantize_weight(w, strategy, weight_observer, h))  # noqa: E731
                hessians = measure_hessians_sequential(model, sequences, rounded, wanted, hf_prefix,
                                                       "static" if static_inputs else "dynamic", 1.0, progress)
            else:
                hessians = measure_hessians(model, sequences, hf_prefix, progress)
            out.hessians = {n: h for n, h in hessians.items() if wanted(n)}
    finally:
        del model
        gc.collect()
    return out


def inc_blocklist_names(herd_modules: list[str], hf_config) -> list[str]:
    """INC blocklist regexes (searched in node names) for herd modules: each module and its sub-nodes."""
    from herd.quant.inc.nodes import NodeNaming

    naming = NodeNaming.for_model(hf_config)
    return ["^" + re.escape(naming.inc_name(m)) + r"(\.|$)" for m in herd_modules]


def add_to_blocklist(config_path: str, names: list[str]) -> None:
    """Append block names to a QUANT_CONFIG json (keeps everything else)."""
    with open(config_path) as f:
        cfg = json.load(f)
    block = cfg.setdefault("blocklist", {"types": [], "names": []})
    block.setdefault("names", [])
    block["names"] += [n for n in names if n not in block["names"]]
    with open(config_path, "w") as f:
        f.write(json.dumps(cfg, indent=4) + "\n")



def _inc_like(hf_name: str) -> str:
    """A checkpoint module name as INC names the fused node it belongs to."""
    return re.sub(r"\.(gate|up)_proj$", ".gate_up_proj", re.sub(r"\.(q|k|v)_proj$", ".qkv_proj", hf_name))


def keep_bf16_for_inc(model_path: str, prompts: list[str], quant_config: str, bf16_layers: str | int,
                      per_channel: bool, progress: bool = True, blocklist: list[str] = (),
                      activations: str = "static", input_backoff: float = 0.25) -> RecoveryPlan:
    """`herd calibrate`: measure on the calibration prompts and add the kept layers' nodes to the
    QUANTIZE config's blocklist (INC then leaves them in bf16, on Gaudi as in herd). Modules that
    `blocklist` regexes already leave in bf16 are not scored. Layers are scored with activations
    quantized as the scale method will run them: static per-tensor scales (maxabs over the prompts /
    (448 * input_backoff)) or, for the dynamic methods, per token; a layer whose input has a rare
    huge value (SmolLM2's BOS token makes one 300x the rest) costs far more with a static scale."""
    from herd.engine.tokenizer import get_tokenizer

    seqs = []
    if bf16_layers not in ("none", 0):  # nothing to score otherwise: no tokenizer needed
        tok = get_tokenizer(model_path)
        seqs = _limit_tokens([tok.encode(p, add_special_tokens=False) for p in prompts], SENSITIVITY_TOKENS)
    is_quantized = lambda n: not any(re.search(b, _inc_like(n)) for b in blocklist)  # noqa: E731
    out = plan(model_path, is_quantized, bf16_layers, seqs, f"{len(seqs)} calibration prompts",
               strategy="channel" if per_channel else "tensor", progress=progress,
               activations=activations, input_backoff=input_backoff)
    if out.sensitivity is not None and (out.sensitivity.keep or out.sensitivity.keep_linears):
        add_to_blocklist(quant_config, inc_blocklist_names(out.kept_modules(herd_names=True), out.hf_config))
    return out


# ---- INC: GPTQ rounding baked into the bf16 checkpoint -------------------------------------------
INC_GPTQ_SCALE_METHODS = ("act_maxabs_hw_weights_pcs_maxabs_pow2", "act_maxabs_pow2_weights_pcs_maxabs_pow2")


def inc_pow2_channel_scale(w: torch.Tensor, fmt_max: float, backoff: float = 0.5) -> torch.Tensor:
    """INC's per-channel POW2 weight scale [out, 1]: 2^ceil(log2(max(amax_c / (fs * b_w), tiny)))."""
    from herd.quant.formats import TINY_BF16, pow2_ceil

    amax = w.detach().float().abs().amax(dim=1, keepdim=True).double()
    return pow2_ceil(torch.clamp(amax / (fmt_max * backoff), min=TINY_BF16)).float()


def inc_gptq_rounded(w: torch.Tensor, hessian: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """`w` GPTQ-rounded onto the FP8 grid of INC's per-channel power-of-two scale, as float32 values
    s_c * q (exact in bf16: q has 4 significant bits, s_c is a power of two)."""
    from herd.quant.observers import dequantize_fp8, gptq_round

    s = inc_pow2_channel_scale(w, fmt_max)
    return dequantize_fp8(gptq_round(w.float(), s, hessian), s)


def write_gptq_rounded_checkpoint(model_path: str, out_dir: str, hessians: dict[str, torch.Tensor],
                                  fmt_max: float = 448.0, progress: bool = True,
                                  targets: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Copy `model_path` to `out_dir` with every Linear weight that has a Hessian GPTQ-rounded onto
    the FP8 grid of INC's per-channel power-of-two scale: w' = s_c * q, exact in bf16 (q has 4
    significant bits, s_c is a power of two). INC's QUANTIZE step then recomputes a power-of-two
    scale from w' (s_c or a neighbouring power of two) and gets back exactly q, so the files INC
    reads and writes stay standard. `targets`: refitted weights to round instead of the checkpoint's
    (asymmetric calibration, see measure_hessians_sequential). Returns the rounded module names."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    files = sorted(f for f in os.listdir(model_path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_path}")
    done = []
    for fn in os.listdir(model_path):
        src = os.path.join(model_path, fn)
        if os.path.isfile(src) and not fn.endswith(".safetensors"):
            shutil.copy2(src, os.path.join(out_dir, fn))
    for fn in tqdm(files, desc="gptq", unit="shard", disable=not progress):
        tensors = {}
        with safe_open(os.path.join(model_path, fn), "pt") as f:
            metadata = f.metadata()
            for name in f.keys():
                t = f.get_tensor(name)
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if module in hessians and t.dim() == 2:
                    src = targets[module] if targets and module in targets else t
                    t = inc_gptq_rounded(src, hessians[module], fmt_max).to(t.dtype)
                    done.append(module)
                tensors[name] = t.contiguous()
        save_file(tensors, os.path.join(out_dir, fn), metadata=metadata or {"format": "pt"})
    return done


def gptq_for_inc(model_path: str, prompts: list[str], out_dir: str, scale_method: str, device: str,
                 progress: bool = True, skip: list[str] = (), keep: list[str] = (), input_backoff: float = 0.25,
                 sequential: bool = False, asymmetric: bool = False) -> str:
    """`herd calibrate --rounding gptq`: Hessians from the calibration prompts, then the rounded
    bf16 copy that the MEASURE step and serving use. Modules that stay bf16 (blocklist regexes
    `skip`, checkpoint names `keep`) keep their weights. `sequential`: each layer's Hessians on the
    states of the layers before it in FP8 (rounded weights, static input scales maxabs / (fullscale
    * `input_backoff`)); `asymmetric` (implies sequential): each FP8 weight refitted to the unquantized
    model's outputs first. Returns the copy's folder."""
    from herd.engine.tokenizer import get_tokenizer
    from herd.model.loader import load_model
    from herd.quant.hessian import measure_hessians, measure_hessians_sequential

    if scale_method not in INC_GPTQ_SCALE_METHODS:
        raise ValueError(f"--rounding gptq needs a per-channel power-of-two weight scale method "
                         f"({' or '.join(INC_GPTQ_SCALE_METHODS)}), got {scale_method}")
    tok = get_tokenizer(model_path)
    seqs = [tok.encode(p, add_special_tokens=False) for p in prompts]
    fmt_max = 240.0 if device == "g2" else 448.0
    wanted = lambda n: n not in set(keep) and not any(re.search(b, _inc_like(n)) for b in skip)  # noqa: E731
    model = load_model(model_path, dtype=torch.float32)
    try:
        hf_prefix = "language_model." if getattr(model.config, "multimodal", False) else ""
        targets = {} if asymmetric else None
        if sequential or asymmetric:
            hessians = measure_hessians_sequential(model, seqs, lambda w, h: inc_gptq_rounded(w, h, fmt_max), wanted,
                                                   hf_prefix, "static", input_backoff * fmt_max / 448.0, progress,
                                                   targets=targets)
        else:
            hessians = measure_hessians(model, seqs, hf_prefix, progress)
        hessians = {n: h for n, h in hessians.items() if wanted(n)}
    finally:
        del model
        gc.collect()
    done = write_gptq_rounded_checkpoint(model_path, out_dir, hessians, fmt_max, progress, targets)
    print(f"GPTQ-rounded {len(done)} Linear weights onto the FP8 grid of {scale_method}: {out_dir}")
    return out_dir
