"""`--quantization inc`: INC's MEASURE and QUANTIZE modes on herd's model, driven by QUANT_CONFIG.

MEASURE: the model runs in its own dtype with maxabs observers on every INC node (linears and the
LM head, MoE op and per-expert intermediates, KV cache and the attention matmuls vLLM-HPU patches);
`finish()` writes the INC measurement files, suffixed `_<rank>_<world>` even for one rank.
QUANTIZE: scales come from this rank's measurement file (or INC's scale cache); linear and expert
weights are quantized to FP8 on the CPU with those scales, activations use the static input
scales, and the KV-cache scales feed `--kv-cache-dtype fp8_inc`. With `dynamic_quantization`
(maxabs_pcs_pow2, act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw) nothing is measured: weight scales
come from the weights, activations get power-of-two scales per token at run time.
"""
from __future__ import annotations

import logging

import torch

from herd.model.layers import LinearBase, ParallelLMHead
from herd.model.llama4 import Attention, FusedMoE, QuantMethods
from herd.ops.fp8 import FP8_DTYPE, FP8_MAX
from herd.ops.moe import fused_moe, fused_moe_ref, grouped_gemm, grouped_moe_supported
from herd.quant.inc.config import IncQuantConfig
from herd.quant.inc.measure import MeasurementCollector
from herd.quant.inc.nodes import NodeNaming, inc_nodes_for_module, is_selected, node_weight
from herd.quant.inc.scales import NodeScales, scales_for_rank, weight_scale
from herd.quant.methods.fp8 import Fp8LinearMethod, Fp8MoEMethod
from herd.quant.methods.inc_attention import attention_observer

logger = logging.getLogger(__name__)


class IncMeasureMethods(QuantMethods):
    """MEASURE mode: weights stay unquantized; post_load installs the observers."""

    def __init__(self, cfg: IncQuantConfig, naming: NodeNaming):
        self.cfg, self.naming = cfg, naming
        self.collector: MeasurementCollector | None = None

    def post_load(self, model):
        # vLLM-HPU runs under torch.distributed even at TP=1, so INC there names files _0_1: so does herd
        self.collector = MeasurementCollector(self.cfg, model.tp.rank, model.tp.size)
        self.collector.prepare_output_dir()
        self.collector.add_model(model, self.naming)
        for name, module in model.named_modules():
            node = self.naming.inc_name(name)
            if isinstance(module, (LinearBase, ParallelLMHead)):
                module.quant_method = _ObservedLinear(module.quant_method, self.collector, node, module)
            elif isinstance(module, FusedMoE):
                module.quant_method = _ObservedMoE(self.collector, node + ".moe_op", model.tp)
            elif isinstance(module, Attention):
                module.register_forward_hook(attention_observer(self.collector, node + ".impl"))
        # one forward = one model call; counted for calibration_sample_interval dumps
        model.register_forward_hook(lambda *_: self.collector.step())

    def finish(self):
        if self.collector is not None:
            paths = self.collector.save()
            logger.info("INC measurements written: %s", ", ".join(map(str, paths)))
            return paths
        return []


class _ObservedLinear:
    def __init__(self, inner, collector, node, layer):
        self.inner, self.collector, self.node = inner, collector, node
        self.row_parallel = type(layer).__name__ == "RowParallelLinear"

    def apply(self, layer, x):
        self.collector.observe(self.node, "inputs", 0, x)
        y = self.inner.apply(layer, x)
        if self.row_parallel and self.collector.wants(self.node, "outputs"):
            # [max over ranks of the partial output, the all-reduced output]
            amax = layer.tp.all_reduce(y.detach().abs().amax().float().reshape(1), op="max")
            self.collector.observe_amax(self.node, "outputs", 0, amax[0])
            reduced = layer.tp.all_reduce(y.clone()) if layer.tp.size > 1 else y
            self.collector.observe(self.node, "outputs", 1, reduced)
        return y


class _ObservedMoE:
    """Unquantized experts plus INC's dynamic_moe statistics: the op input, its output and each
    local expert's intermediate (w2 input) amax, 0 for experts that got no tokens.

    The grouped fast path reduces the per-row amax of the w2 input into per-expert maxima on the
    device (scatter_reduce over the sorted rows); `use_reference=True` runs the per-expert loop."""

    def __init__(self, collector, node, tp, use_reference: bool = False):
        self.collector, self.node, self.tp = collector, node, tp
        self.use_reference = use_reference

    def apply(self, layer, x, topk_ids, topk_weights):
        E = layer.num_local_experts
        amax = torch.zeros(E, dtype=torch.float32, device=x.device)
        if not self.use_reference and grouped_moe_supported(x, layer.w13_weight, layer.w2_weight):
            def gemm(a, which, r):
                if which == "w2":  # rows of other-rank pairs are uninitialized: they count as 0
                    row = torch.where(r.valid, a.detach().abs().amax(dim=-1).float(), 0.0)
                    per_expert = torch.zeros(E + 1, dtype=torch.float32, device=a.device)
                    amax.copy_(per_expert.scatter_reduce_(0, r.expert, row, "amax")[:E])
                return grouped_gemm(a, getattr(layer, f"{which}_weight"), r.offs)

            out = fused_moe(x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
                            expert_map=layer.expert_map, gemm=gemm)
        else:
            def linear(h, e, which):
                if which == "w2":
                    amax[e] = torch.maximum(amax[e], h.detach().abs().amax().float())
                return torch.nn.functional.linear(h, getattr(layer, f"{which}_weight")[e])

            out = fused_moe_ref(x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
                                expert_map=layer.expert_map, linear=linear)
        self.collector.observe(self.node, "inputs", 0, x)
        if self.collector.wants(self.node, "outputs"):
            self.collector.observe(self.node, "outputs", 0, out)
            self.collector.observe_expert_amax(self.node, amax)
        return out


class IncQuantizeMethods(QuantMethods):
    """QUANTIZE mode: static FP8 from measured scales, applied in post_load (weights on the CPU)."""

    def __init__(self, cfg: IncQuantConfig, naming: NodeNaming):
        self.cfg, self.naming = cfg, naming
        self.kv_scales: dict[int, tuple[float, float]] = {}
        self.report: dict = {}

    def post_load(self, model):
        if self.cfg.dynamic_quantization:
            return self._post_load_dynamic(model)
        nodes = {}
        for name, module in model.named_modules():
            for node in inc_nodes_for_module(name, type(module).__name__,
                                             getattr(module, "num_local_experts", None), self.naming):
                nodes[node.name] = node
        weights = lambda n: node_weight(model, nodes[n]) if n in nodes else None  # noqa: E731
        classes = {n: node.class_name for n, node in nodes.items()}
        # herd's FP8 is E4M3FN (448) on every device; device_for_scales in QUANT_CONFIG overrides
        scales = scales_for_rank(self.cfg, model.tp.rank, model.tp.size, "cuda", weights=weights,
                                 node_classes=classes).nodes
        n_lin = n_moe = 0
        for name, module in model.named_modules():
            full = self.naming.inc_name(name)
            if isinstance(module, LinearBase) and full in scales:
                _quantize_linear(module, scales[full])
                n_lin += 1
            elif isinstance(module, FusedMoE) and full + ".moe_op" in scales:
                _quantize_moe(module, scales, full)
                n_moe += 1
            elif isinstance(module, Attention):
                k, v = scales.get(full + ".impl.k_cache"), scales.get(full + ".impl.v_cache")
                if k is not None and v is not None:
                    self.kv_scales[module.layer_idx] = (float(k.inputs[0]), float(v.inputs[0]))
        self.report = {"linear": n_lin, "moe": n_moe, "kv_layers": len(self.kv_scales)}
        logger.info("INC static FP8: %d linears, %d MoE layers, KV scales for %d layers", n_lin, n_moe,
                    len(self.kv_scales))

    def _post_load_dynamic(self, model):
        """dynamic_quantization: no measurements. Weight scales by the method's weight rule (PCS
        or PTS, power of two / HW-aligned, as the static methods compute them), and activations
        scaled per token at run time by powers of two with the method's (INC-version) backoff.
        INC quantizes no KV cache, softmax or fused SDPA dynamically (NOT_DYNAMIC), so neither does this."""
        device = self.cfg.scale_device("cuda")
        fmt = self.cfg.format_for(device)

        def rules(node):
            return self.cfg.rules_for(node.name, node.class_name) if is_selected(node.name, node.class_name,
                                                                                   self.cfg) else None
        n_lin = n_moe = 0
        for name, module in model.named_modules():
            nodes = inc_nodes_for_module(name, type(module).__name__, getattr(module, "num_local_experts", None),
                                         self.naming)
            if isinstance(module, LinearBase) and nodes and (r := rules(nodes[0])) is not None:
                w_rule, in_rule, _ = r
                s = weight_scale(w_rule, device, fmt, module.weight.data)
                _quantize_linear(module, NodeScales(weight=s), pow2_backoff=in_rule.backoff)
                n_lin += 1
            elif isinstance(module, FusedMoE) and nodes and (r := rules(nodes[0])) is not None:
                experts = {n.name: rules(n) for n in nodes[1:]}
                missing = [n for n, rule in experts.items() if rule is None]
                if missing:
                    raise ValueError(f"{nodes[0].name} is quantized but its expert {missing[0]} is not: herd "
                                     "quantizes a MoE layer's experts all or none")
                scales = {n.name: NodeScales(weight=weight_scale(experts[n.name][0], device, fmt,
                                                                 node_weight(model, n)))
                          for n in nodes[1:]}
                _quantize_moe(module, scales, nodes[0].name[:-len(".moe_op")], pow2_backoff=r[1].backoff)
                n_moe += 1
        self.report = {"linear": n_lin, "moe": n_moe, "kv_layers": 0}
        logger.info("INC dynamic FP8: %d linears, %d MoE layers (per-token power-of-two activation scales)",
                    n_lin, n_moe)

    def finish(self):
        return []


def _as_column(s, rows: int) -> torch.Tensor:
    t = torch.as_tensor(s, dtype=torch.float32)
    return t.reshape(-1, 1) if t.numel() > 1 else t.reshape(1, 1).expand(rows, 1).contiguous()


def _to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _quantize_linear(layer, ns, pow2_backoff: float | None = None):
    """Static input scale from `ns`, or (pow2_backoff) INC's dynamic per-token scales."""
    w = layer.weight.data
    scale = _as_column(ns.weight, w.shape[0])
    dynamic = pow2_backoff is not None
    method = Fp8LinearMethod(from_checkpoint=True, static_input=not dynamic, pow2_backoff=pow2_backoff)
    layer.weight = torch.nn.Parameter(_to_fp8(w, scale), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
    if not dynamic:
        layer.input_scale = torch.nn.Parameter(torch.tensor([float(ns.inputs[0])]), requires_grad=False)
    layer.quant_method = method


def _quantize_moe(layer, scales, full, pow2_backoff: float | None = None):
    E = layer.num_local_experts
    for which in ("w13", "w2"):
        w = getattr(layer, f"{which}_weight").data
        qs, ss = [], []
        for e in range(E):
            ns = scales.get(f"{full}.moe_op.{which}_list.{e}")
            if ns is None:
                raise ValueError(f"no INC scale for {full}.moe_op.{which}_list.{e}")
            s = _as_column(ns.weight, w.shape[1])
            qs.append(_to_fp8(w[e], s))
            ss.append(s)
        setattr(layer, f"{which}_weight", torch.nn.Parameter(torch.stack(qs), requires_grad=False))
        setattr(layer, f"{which}_weight_scale", torch.nn.Parameter(torch.stack(ss), requires_grad=False))
    if pow2_backoff is not None:
        layer.quant_method = Fp8MoEMethod(from_checkpoint=True, pow2_backoff=pow2_backoff)
        return
    moe = scales[full + ".moe_op"]
    # input scales by global expert id: the hidden-state scale for w13, each expert's own for w2
    first = layer.tp.rank * E if layer.ep else 0
    w13_in = torch.full((layer.num_experts,), float(moe.inputs[0]))
    w2_in = torch.ones(layer.num_experts)
    w2_in[first:first + E] = torch.tensor([float(s) for s in moe.inputs[1:1 + E]])
    layer.w13_input_scale = torch.nn.Parameter(w13_in, requires_grad=False)
    layer.w2_input_scale = torch.nn.Parameter(w2_in, requires_grad=False)
    layer.quant_method = Fp8MoEMethod(from_checkpoint=True, static_input=True)


def get_inc_quant_methods(config) -> QuantMethods:
    path = config.quant.quant_config_path
    if not path:
        raise ValueError("--quantization inc needs a QUANT_CONFIG json: set the QUANT_CONFIG environment "
                         "variable or pass --quant-config")
    cfg = IncQuantConfig.from_json_file(path)
    naming = NodeNaming.for_model(config.model.hf_config)
    if cfg.mode == "MEASURE":
        return IncMeasureMethods(cfg, naming)
    if cfg.mode in ("QUANTIZE", "LOAD"):
        return IncQuantizeMethods(cfg, naming)
    raise ValueError(f"QUANT_CONFIG mode {cfg.mode} is not supported by herd (use MEASURE or QUANTIZE)")

