"""Activation amax for the static `fp8` scheme, measured by running herd's own model.

Forward hooks on herd's linears record max |input| per module; herd's fused layers are mapped
back to the HF modules the checkpoint stores (qkv_proj -> q/k/v_proj, gate_up_proj ->
gate/up_proj), each getting the fused input's amax. Routed experts are measured as the runtime
sees them: only the tokens routed to an expert, with the router weight already applied to the
input (vLLM's and herd's Llama 4 MoE). llm-compressor instead sends every token through every
expert un-gated, which gives larger (safer, coarser) scales. An expert that received no token
gets its layer's largest expert amax, so no scale collapses to eps (vLLM takes the max over
experts anyway).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from herd.quant.compressed_tensors.config import checkpoint_ffn_name, herd_to_hf_modules


def _amax(x: torch.Tensor) -> float:
    return float(x.detach().abs().amax().float()) if x.numel() else 0.0


class _AmaxRecorder:
    """Running max per HF module name."""

    def __init__(self):
        self.amax: dict[str, float] = {}

    def update(self, names: Iterable[str], value: float) -> None:
        for n in names:
            self.amax[n] = max(self.amax.get(n, 0.0), value)


def _expert_hook(recorder: _AmaxRecorder, experts_name: str, hf_prefix: str):
    from herd.ops.moe import silu_and_mul

    def hook(module, args):
        x, topk_ids, topk_weights = args[:3]
        for e in range(module.num_local_experts):
            routed = topk_ids == e
            tok = routed.any(dim=-1)
            if not bool(tok.any()):
                continue
            w = (topk_weights * routed).sum(dim=-1)[tok].to(x.dtype)[:, None]
            xin = x[tok] * w  # Llama 4 gates the expert input
            mid = silu_and_mul(F.linear(xin, module.w13_weight[e]))
            base = f"{hf_prefix}{experts_name}.{e}"
            recorder.update([base + ".gate_proj", base + ".up_proj"], _amax(xin))
            recorder.update([base + ".down_proj"], _amax(mid))

    return hook


@torch.no_grad()
def measure_input_amax(
    model: torch.nn.Module,
    sequences: Iterable[Sequence[int]],
    hf_prefix: str = "",
    progress: bool = True,
) -> dict[str, float]:
    """Run `model` (herd Llama4ForCausalLM, unquantized, single rank) over token-id sequences and
    return HF module name -> max |input| for every linear, lm_head and routed expert."""
    from herd.model.layers import LinearBase, ParallelLMHead
    from herd.model.llama4 import FusedMoE

    if getattr(model, "tp", None) is not None and model.tp.size != 1:
        raise ValueError("activation calibration runs on a single rank (tensor_parallel_size 1)")
    recorder = _AmaxRecorder()
    ffn = checkpoint_ffn_name(getattr(model, "config", None))  # amax keys: the checkpoint's names
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (LinearBase, ParallelLMHead)):
            hf_names = herd_to_hf_modules(name, hf_prefix, ffn=ffn)
            handles.append(module.register_forward_pre_hook(
                lambda m, args, hf_names=hf_names: recorder.update(hf_names, _amax(args[0]))))
        elif isinstance(module, FusedMoE):
            if module.ep:
                raise ValueError("activation calibration does not support expert parallelism")
            handles.append(module.register_forward_pre_hook(_expert_hook(recorder, name, hf_prefix)))
    device = next(model.parameters()).device
    try:
        for ids in tqdm(list(sequences), desc="calibrate", unit="seq", disable=not progress):
            ids = torch.as_tensor(list(ids), dtype=torch.long, device=device)
            if ids.numel() == 0:
                continue
            hidden = model(ids, torch.arange(ids.numel(), device=device))
            model.compute_logits(hidden)
    finally:
        for h in handles:
            h.remove()
    _fill_unrouted_experts(model, recorder.amax, hf_prefix)
    return recorder.amax


def _fill_unrouted_experts(model: torch.nn.Module, amax: dict[str, float], hf_prefix: str) -> None:
    from herd.model.llama4 import FusedMoE

    for name, module in model.named_modules():
        if not isinstance(module, FusedMoE):
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names = [f"{hf_prefix}{name}.{e}.{proj}" for e in range(module.num_local_experts)]
            seen = [amax[n] for n in names if amax.get(n, 0.0) > 0]
            if not seen:
                continue  # the writer reports the missing values with the module name
            for n in names:
                if amax.get(n, 0.0) <= 0:
                    amax[n] = max(seen)


def calibrate_input_amax(
    model_path: str,
    sequences: Iterable[Sequence[int]],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Load the bf16 checkpoint with herd's loader and measure activation amax on `sequences`."""
    from herd.model.loader import load_model

    model = load_model(model_path, dtype=dtype, device=device)
    hf_prefix = "language_model." if model.config.multimodal else ""
    return measure_input_amax(model, sequences, hf_prefix, progress)


def load_calibration_sequences(
    path: str, model_path: str, num_samples: int = 512, max_seq_length: int = 2048
) -> list[list[int]]:
    """Token ids from a calibration file: `.txt` (one prompt per line) or `.jsonl` (objects with
    a "text" or "prompt" field), tokenized with the model folder's tokenizer."""
    from transformers import AutoTokenizer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {path!r} not found")
    texts: list[str] = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                obj = json.loads(line)
                text = obj.get("text", obj.get("prompt")) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_no}: expected an object with a 'text' or 'prompt' string")
                texts.append(text)
            else:
                texts.append(line)
            if len(texts) >= num_samples:
                break
    if not texts:
        raise ValueError(f"calibration file {path!r} holds no prompts")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return [tokenizer(t, add_special_tokens=True)["input_ids"][:max_seq_length] for t in texts]
