"""Accuracy report after quantization: the original and the quantized checkpoint run side by side
on a few prompts; per decoder layer, the relative error of its output; overall, both perplexities.

Runs on the CPU in float32 (the reference arithmetic), so it suits checkpoints that fit in memory;
`herd quantize --no-report` skips it for the big ones.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

# Public-domain English (Genesis 1:1-5, KJV) used when no calibration text is given.
DEFAULT_TEXTS = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: and "
    "God divided the light from the darkness. And God called the light Day, and the darkness he called "
    "Night. And the evening and the morning were the first day.",
)


@dataclass
class AccuracyReport:
    num_tokens: int
    ppl_original: float
    ppl_quantized: float
    recovery_percent: float                       # ppl_original / ppl_quantized * 100
    layer_rel_error: list[float] = field(default_factory=list)   # per decoder layer
    logits_rel_error: float = 0.0
    kept_bf16: dict[str, str] = field(default_factory=dict)      # Linear kept unquantized -> why

    def format(self) -> str:
        lines = [f"accuracy report ({self.num_tokens} tokens): perplexity {self.ppl_original:.4f} -> "
                 f"{self.ppl_quantized:.4f} (recovery {self.recovery_percent:.2f}%), "
                 f"logits relative error {self.logits_rel_error:.4f}",
                 "  layer  output relative error"]
        lines += [f"  {i:5d}  {e:.5f}" for i, e in enumerate(self.layer_rel_error)]
        if self.kept_bf16:
            lines.append(f"  kept in bf16 ({len(self.kept_bf16)} Linear modules):")
            groups: dict[str, list[str]] = {}
            for name, why in self.kept_bf16.items():
                groups.setdefault(why, []).append(name)
            for why, names in groups.items():
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                lines.append(f"    {shown}: {why}")
        return "\n".join(lines)

    def save(self, path: str):
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)


def _capture_layers(model, store: list):
    return [layer.register_forward_hook(lambda _m, _a, out, i=i: store.__setitem__(i, out.detach().float()))
            for i, layer in enumerate(model.model.layers)]


def _run(model, ids: torch.Tensor):
    """Layer outputs, logits and summed NLL of one sequence (no cache)."""
    outs = [None] * len(model.model.layers)
    hooks = _capture_layers(model, outs)
    try:
        with torch.no_grad():
            logits = model.compute_logits(model(ids, torch.arange(len(ids)))).float()
    finally:
        for h in hooks:
            h.remove()
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
    return outs, logits, nll


def compare_models(original, quantized, sequences: list[list[int]]) -> AccuracyReport:
    n_layers = len(original.model.layers)
    num = [0.0] * n_layers
    den = [0.0] * n_layers
    lnum = lden = nll_o = nll_q = 0.0
    tokens = 0
    for seq in sequences:
        ids = torch.tensor(seq, dtype=torch.long)
        out_o, log_o, n_o = _run(original, ids)
        out_q, log_q, n_q = _run(quantized, ids)
        for i in range(n_layers):
            num[i] += (out_q[i] - out_o[i]).pow(2).sum().item()
            den[i] += out_o[i].pow(2).sum().item()
        lnum += (log_q - log_o).pow(2).sum().item()
        lden += log_o.pow(2).sum().item()
        nll_o, nll_q, tokens = nll_o + n_o, nll_q + n_q, tokens + len(seq) - 1
    ppl_o, ppl_q = math.exp(nll_o / tokens), math.exp(nll_q / tokens)
    return AccuracyReport(num_tokens=tokens, ppl_original=ppl_o, ppl_quantized=ppl_q,
                          recovery_percent=ppl_o / ppl_q * 100.0,
                          layer_rel_error=[math.sqrt(a / max(b, 1e-30)) for a, b in zip(num, den)],
                          logits_rel_error=math.sqrt(lnum / max(lden, 1e-30)))


def quantization_report(original_path: str, quantized_path: str, texts: list[str] | None = None,
                        max_tokens: int = 512) -> AccuracyReport:
    """Load both checkpoints with herd (float32, CPU) and compare them on `texts`."""
    from herd.config import EngineConfig
    from herd.engine.tokenizer import get_tokenizer
    from herd.model.loader import load_model
    from herd.quant.methods import get_quant_methods

    tokenizer = get_tokenizer(original_path)
    sequences = [tokenizer.encode(t)[:max_tokens] for t in (texts or DEFAULT_TEXTS)]
    sequences = [s for s in sequences if len(s) > 1]
    if not sequences:
        raise ValueError("the report texts are empty after tokenization")
    original = load_model(original_path, dtype=torch.float32)
    cfg = EngineConfig.from_kwargs(quantized_path, dtype="float32", device="cpu")
    quantized = load_model(quantized_path, dtype=torch.float32, quant=get_quant_methods(cfg),
                           config=cfg.model.hf_config)
    return compare_models(original, quantized, sequences)
