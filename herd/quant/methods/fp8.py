"""FP8 quant methods (online FP8 and compressed-tensors checkpoints). Factories:
  * Fp8QuantMethods: `--quantization fp8`, BF16 checkpoint quantized at load (per-channel weights,
    per-token dynamic activations), vLLM's online FP8.
  * CompressedTensorsQuantMethods: FP8 checkpoints from `herd quantize` / llm-compressor.
  * INC static scales live in herd.quant.methods.inc (built from QUANT_CONFIG measurements).
Weights are quantized on the CPU right after loading, before the model moves to the device.
"""
from __future__ import annotations

import torch
from torch import nn

from herd.model.layers import UnquantizedLinearMethod
from herd.model.llama4 import QuantMethods
from herd.ops.fp8 import FP8_DTYPE, FP8_MAX, fp8_linear, quantize_per_token, quantize_weight
from herd.ops.moe import MoeRouting, fused_moe, fused_moe_ref, grouped_gemm, grouped_mm_supported, triton_moe_gemm
from herd.quant.compressed_tensors.config import herd_to_hf_modules


# herd's Triton grouped GEMM for FP8 experts at decode sizes (herd.ops.moe.triton_moe_gemm): off
# until a GPU run shows it as accurate as torch._scaled_grouped_mm against an fp32 product
# (benchmarks/gpu_check.py reports both; docs/benchmarks.md, GPU).
TRITON_FP8_MOE = False


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Fp8LinearMethod:
    """FP8 E4M3 weight [out, in] + fp32 scale [out, 1]; activations per token (dynamic) or with a
    static per-tensor `input_scale`."""

    def __init__(self, from_checkpoint: bool = False, static_input: bool = False, weight_scaler=None,
                 pow2_backoff: float | None = None):
        self.from_checkpoint, self.static_input = from_checkpoint, static_input
        # dynamic inputs with INC's power-of-two per-token scales (fp8_linear's pow2_backoff)
        self.pow2_backoff = pow2_backoff
        # weight_scaler(weight) -> scale [out, 1]; default: per-channel amax / 448
        self.weight_scaler = weight_scaler

    def create_weights(self, layer, dtype):
        if not self.from_checkpoint:
            UnquantizedLinearMethod().create_weights(layer, dtype)
        else:
            layer.weight = _param(torch.empty(layer.out_local, layer.in_local, dtype=FP8_DTYPE))
            layer.weight_scale = _param(torch.ones(layer.out_local, 1, dtype=torch.float32))
        if self.static_input:
            layer.input_scale = _param(torch.zeros(1, dtype=torch.float32))

    def process_weights_after_loading(self, layer):
        if not self.from_checkpoint:
            w = layer.weight.data
            if self.weight_scaler is None:
                wq, scale = quantize_weight(w, per_channel=True)
            else:
                scale = self.weight_scaler(w).float().reshape(-1, 1)
                wq = (w.float() / scale).clamp(-448, 448).to(FP8_DTYPE)
            layer.weight = _param(wq)
            layer.weight_scale = _param(scale)
        if self.static_input and float(layer.input_scale) <= 0:
            raise ValueError("a static FP8 layer has no input_scale in the checkpoint")

    def apply(self, layer, x):
        return fp8_linear(x, layer.weight, layer.weight_scale,
                          layer.input_scale if self.static_input else None, self.pow2_backoff)


class Fp8MoEMethod:
    """Per-expert FP8 weights with per-output-channel scales; tokens sorted by expert.

    apply() runs the grouped fast path (herd.ops.moe.fused_moe): the activations of a projection are
    quantized once for all experts (per-token dynamic scales on the permuted rows, or each row's
    expert's static input scale), then
      * CUDA sm90/sm100 with bf16 activations: torch._scaled_grouped_mm, the GEMM in FP8. (herd's
        Triton kernel takes the same W8A8 product and streamed the weights 1.5x faster at decode
        sizes on an H200, but its output is not yet shown to be as accurate: one fused-MoE parity
        check went 3.1% over a 3% tolerance; docs/benchmarks.md, GPU. TRITON_FP8_MOE turns it on.)
      * CPU: weights and activations dequantized to fp32 (exactly as the reference fp8_linear_ref
        does) and torch._grouped_mm in fp32. This is for accuracy, not speed: it builds an fp32
        copy of every expert's weights on each call;
      * otherwise (other GPUs, unaligned dims, torch.compile on the CPU, whose _grouped_mm meta is
        bf16-only) the per-expert reference loop.
    `use_reference=True` always runs the reference loop (fused_moe_ref with per-expert fp8_linear)."""

    def __init__(self, from_checkpoint: bool = False, static_input: bool = False, use_reference: bool = False,
                 pow2_backoff: float | None = None):
        self.from_checkpoint, self.static_input = from_checkpoint, static_input
        self.use_reference = use_reference
        self.pow2_backoff = pow2_backoff   # dynamic inputs with INC's power-of-two per-token scales

    def create_weights(self, layer, dtype):
        E, D, I = layer.num_local_experts, layer.hidden_size, layer.inter_local
        wdtype = FP8_DTYPE if self.from_checkpoint else dtype
        layer.w13_weight = _param(torch.empty(E, 2 * I, D, dtype=wdtype))
        layer.w2_weight = _param(torch.empty(E, D, I, dtype=wdtype))
        if self.from_checkpoint:
            layer.w13_weight_scale = _param(torch.ones(E, 2 * I, 1, dtype=torch.float32))
            layer.w2_weight_scale = _param(torch.ones(E, D, 1, dtype=torch.float32))
        if self.static_input:
            # indexed by global expert id (checkpoint order); experts of other EP ranks stay unused
            layer.w13_input_scale = _param(torch.zeros(layer.num_experts, dtype=torch.float32))
            layer.w2_input_scale = _param(torch.zeros(layer.num_experts, dtype=torch.float32))

    def process_weights_after_loading(self, layer):
        if self.from_checkpoint:
            return
        for name in ("w13", "w2"):
            w = getattr(layer, f"{name}_weight").data
            qs = [quantize_weight(w[e], per_channel=True) for e in range(w.shape[0])]
            setattr(layer, f"{name}_weight", _param(torch.stack([q for q, _ in qs])))
            setattr(layer, f"{name}_weight_scale", _param(torch.stack([s for _, s in qs])))

    def apply(self, layer, x, topk_ids, topk_weights):
        kind = None if self.use_reference else _fp8_grouped_kind(x, layer.hidden_size, layer.inter_local)
        if kind is None:
            return self.apply_reference(layer, x, topk_ids, topk_weights)
        return fused_moe(x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
                         apply_router_weight_on_input=True, expert_map=layer.expert_map,
                         gemm=self._grouped_gemm(layer, kind))

    def apply_reference(self, layer, x, topk_ids, topk_weights):
        def linear(h, e, which):
            scale = getattr(layer, f"{which}_input_scale") if self.static_input else None
            if scale is not None:
                scale = scale[self._global(layer, e)].reshape(1)
            return fp8_linear(h, getattr(layer, f"{which}_weight")[e], getattr(layer, f"{which}_weight_scale")[e],
                              scale, self.pow2_backoff)
        return fused_moe_ref(x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
                             apply_router_weight_on_input=True, expert_map=layer.expert_map, linear=linear)

    def _grouped_gemm(self, layer, kind: str):
        E = layer.num_local_experts
        first = self._global(layer, 0)

        def gemm(a: torch.Tensor, which: str, r: MoeRouting) -> torch.Tensor:
            wq, ws = getattr(layer, f"{which}_weight"), getattr(layer, f"{which}_weight_scale")
            if self.static_input:  # each row takes its expert's scale; other-rank rows any valid one
                scales = getattr(layer, f"{which}_input_scale").narrow(0, first, E).float()
                a_scale = scales[r.expert.clamp(max=E - 1)][:, None]
                aq = (a.float() / a_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            else:
                aq, a_scale = quantize_per_token(a, self.pow2_backoff)
            N = wq.shape[1]
            moe_gemm = triton_moe_gemm(a.shape[0], E, a.device) if kind == "scaled" and TRITON_FP8_MOE else None
            if moe_gemm is not None:   # decode sizes: herd's Triton kernel, the same W8A8 product
                return moe_gemm(aq, wq, r.offs, a_scale, ws, out_dtype=a.dtype)
            if kind == "scaled":
                b_scale = ws.float().reshape(E, -1).expand(E, N).contiguous()
                return torch._scaled_grouped_mm(aq, wq.transpose(-2, -1), a_scale.reshape(-1).contiguous(), b_scale,
                                                offs=r.offs, out_dtype=a.dtype)
            w = wq.float() * ws.float().reshape(E, -1, 1)
            return grouped_gemm(aq.float() * a_scale, w, r.offs).to(a.dtype)

        return gemm

    @staticmethod
    def _global(layer, e):
        return e + (layer.tp.rank * layer.num_local_experts if layer.ep else 0)


def _fp8_grouped_kind(x: torch.Tensor, hidden: int, inter: int) -> str | None:
    """Which grouped FP8 GEMM Fp8MoEMethod can use for activations like x, or None for the loop."""
    if x.is_cuda:
        if (x.dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm") and hidden % 16 == 0
                and inter % 16 == 0 and torch.cuda.get_device_properties(x.device).major in (9, 10)):
            return "scaled"
        return None  # the dequantized fp32 stack would cost a full weight copy per call on a GPU
    if x.device.type == "cpu" and grouped_mm_supported(torch.float32, x.device, hidden, inter):
        return "dequant"
    return None


def _is_router(prefix: str) -> bool:
    return prefix.endswith(".router")


class Fp8QuantMethods(QuantMethods):
    """Online FP8 (`--quantization fp8`): every Linear and expert except the router and lm_head."""

    def linear(self, prefix):
        return None if _is_router(prefix) else Fp8LinearMethod()

    def moe(self, prefix):
        return Fp8MoEMethod()


class CompressedTensorsQuantMethods(QuantMethods):
    """FP8 compressed-tensors checkpoints: quantized modules arrive as FP8 + scales, ignored ones
    stay in the model dtype (the recipe keeps attention, router, lm_head and vision in BF16).
    `ffn`: the checkpoint's name for herd's `feed_forward` ("mlp" for dense Llama), which its
    `ignore` list uses."""

    def __init__(self, ct_config, ffn: str = "feed_forward"):
        self.ct = ct_config
        self.static_input = ct_config.is_static_input
        self.ffn = ffn

    def _ignored(self, prefix: str) -> bool:
        # the checkpoint's names for the module (expert 0 stands for all of a FusedMoE's)
        names = herd_to_hf_modules(prefix, num_experts=1, ffn=self.ffn)
        flags = [self.ct.is_ignored(n) or self.ct.is_ignored("language_model." + n) for n in names]
        if any(flags) != all(flags):
            raise ValueError(f"{prefix}: the checkpoint quantizes only some of {names}; herd fuses them "
                             "into one layer, so they must share a scheme")
        return all(flags)

    def linear(self, prefix):
        if self._ignored(prefix):
            return None
        return Fp8LinearMethod(from_checkpoint=True, static_input=self.static_input)

    def moe(self, prefix):
        if self._ignored(prefix):
            return None
        return Fp8MoEMethod(from_checkpoint=True, static_input=self.static_input)
