#!/usr/bin/env python3
"""Where FP8 loses accuracy: perplexity with FP8 (per-channel weights, per-token dynamic
activations) applied to parts of the model only, on a real checkpoint.

Parts: all linears, attention only (qkv, o), MLP only (gate_up, down), weights only (activations
kept in full precision), activations only (weights kept). With --calib-text, the same with GPTQ
rounding of the weights (Hessians from that text). With --per-layer, the per-decoder-layer scores
of herd.quant.sensitivity (what `herd quantize --bf16-layers auto` ranks by). The model runs in
fp32 so the only error is the FP8 rounding; windows of --window tokens after the tokenizer's BOS,
no overlap.

    python scripts/fp8_sensitivity.py MODEL_FOLDER --text build/austen/mansfieldpark.txt --tokens 4096 \
        --calib-text build/austen/calib_text.jsonl --per-layer
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from herd.engine.tokenizer import get_tokenizer
from herd.model.llama4 import QuantMethods
from herd.model.loader import load_model
from herd.ops.fp8 import quantize_per_token
from herd.quant.compressed_tensors.config import checkpoint_ffn_name, herd_to_hf_modules
from herd.quant.methods import Fp8LinearMethod
from herd.quant.observers import gptq_round, minmax_scale


class WeightOnlyFp8(Fp8LinearMethod):
    def apply(self, layer, x):
        return F.linear(x, (layer.weight.float() * layer.weight_scale).to(x.dtype))


class ActivationOnlyFp8(Fp8LinearMethod):
    def process_weights_after_loading(self, layer):
        pass  # weights stay in the model dtype

    def apply(self, layer, x):
        xq, scale = quantize_per_token(x.reshape(-1, x.shape[-1]))
        return F.linear((xq.float() * scale).to(x.dtype).reshape(x.shape), layer.weight)


def gptq_method(hessians: dict, ffn: str, base=Fp8LinearMethod):
    """`base` with the weights GPTQ-rounded (per-channel amax / 448 scales) instead of to nearest."""

    class Gptq(base):
        def __init__(self, prefix):
            super().__init__()
            hf = herd_to_hf_modules(prefix, ffn=ffn)
            self.h = hessians.get(hf[0]) if hf else None

        def process_weights_after_loading(self, layer):
            if self.h is None:
                return super().process_weights_after_loading(layer)
            w = layer.weight.data.float()
            scale = minmax_scale(w)
            layer.weight = torch.nn.Parameter(gptq_round(w, scale, self.h), requires_grad=False)
            layer.weight_scale = torch.nn.Parameter(scale.reshape(-1, 1), requires_grad=False)

    return Gptq


class SelectedByPrefix(QuantMethods):
    def __init__(self, factory):
        self.factory = factory

    def linear(self, prefix):
        return None if prefix.endswith(".router") else self.factory(prefix)


class Selected(QuantMethods):
    def __init__(self, method, keep=lambda prefix: True):
        self.method, self.keep = method, keep

    def linear(self, prefix):
        return self.method() if self.keep(prefix) and not prefix.endswith(".router") else None


PARTS = {
    "fp8 all linears": Selected(Fp8LinearMethod),
    "fp8 attention only": Selected(Fp8LinearMethod, lambda p: ".self_attn." in p),
    "fp8 MLP only": Selected(Fp8LinearMethod, lambda p: ".feed_forward." in p),
    "fp8 weights only": Selected(WeightOnlyFp8),
    "fp8 activations only": Selected(ActivationOnlyFp8),
}


@torch.inference_mode()
def mean_nll(model, ids: list[int], bos: list[int], window: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        w = torch.tensor(bos + ids[start:start + window])
        logp = torch.log_softmax(model.compute_logits(model(w, torch.arange(len(w)))).float(), -1)
        total -= logp[:-1].gather(1, w[1:, None]).sum().item()
        count += len(w) - 1
    return total / count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="HF checkpoint folder (e.g. the output of python -m herd.gguf.convert)")
    parser.add_argument("--text", required=True)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calib-text", help="jsonl {'text'} rows: also score GPTQ-rounded weights")
    parser.add_argument("--per-layer", action="store_true", help="also score each decoder layer alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tok = get_tokenizer(args.model)
    with open(args.text, encoding="utf-8") as f:
        ids = tok.encode(f.read(), add_special_tokens=False)[: args.tokens]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    base = mean_nll(load_model(args.model, dtype=torch.float32), ids, bos, args.window)
    print(f"{'config':<22} {'mean NLL':>9} {'PPL':>9} {'recovery':>9}")
    print(f"{'fp32':<22} {base:>9.5f} {math.exp(base):>9.4f} {100.0:>8.2f}%")
    parts = dict(PARTS)
    if args.calib_text:
        import json

        from herd.quant.hessian import measure_hessians

        with open(args.calib_text, encoding="utf-8") as f:
            seqs = [tok.encode(json.loads(line)["text"]) for line in f if line.strip()]
        model = load_model(args.model, dtype=torch.float32)
        hessians, ffn = measure_hessians(model, seqs, progress=False), checkpoint_ffn_name(model.config)
        parts["gptq all linears"] = SelectedByPrefix(gptq_method(hessians, ffn))
        parts["gptq weights only"] = SelectedByPrefix(gptq_method(hessians, ffn, WeightOnlyFp8))
        parts["gptq MLP only"] = SelectedByPrefix(
            lambda p: gptq_method(hessians, ffn)(p) if ".feed_forward." in p else None)
    for name, quant in parts.items():
        nll = mean_nll(load_model(args.model, dtype=torch.float32, quant=quant), ids, bos, args.window)
        print(f"{name:<22} {nll:>9.5f} {math.exp(nll):>9.4f} {100 * math.exp(base - nll):>8.2f}%", flush=True)
    if args.per_layer:
        from herd.quant.sensitivity import measure_layer_sensitivity, pick_sensitive

        seqs = [bos + ids[s:s + args.window] for s in range(0, min(len(ids), 2048), args.window)]
        sens = measure_layer_sensitivity(load_model(args.model, dtype=torch.float32), seqs, lambda n: True)
        sens.text = args.text
        pick_sensitive(sens)
        print(f"{'layer':>5} {'KL mnat/token':>14}  (all linears of the layer in FP8, nearest rounding)")
        for sc in sens.scores:
            print(f"{sc.layer:>5} {1000 * sc.kl:>14.3f}{'  kept by auto' if sc.layer in sens.keep else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
