"""compressed-tensors FP8 schemes, the `quantization_config` block of config.json, ignore matching."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

QUANT_METHOD = "compressed-tensors"
FLOAT_QUANTIZED = "float-quantized"
# The compressed-tensors release whose config layout these files follow: the one llm-compressor
# 0.14 pins (per-group `format`, `scale_dtype` / `zp_dtype` in every QuantizationArgs).
FORMAT_VERSION = "0.19.0"

# llm-compressor's Llama 4 recipe: keep the LM head, attention, routers and the vision side in bf16.
DEFAULT_IGNORE = (
    "re:.*lm_head",
    "re:.*self_attn",
    "re:.*router",
    "re:.*vision_model.*",
    "re:.*multi_modal_projector.*",
)


@dataclass(frozen=True)
class QuantizationArgs:
    """One `weights` / `input_activations` entry of a config group (FP8 E4M3 only)."""

    strategy: str  # weights: channel | tensor | block; activations: token | tensor | group
    dynamic: bool = False
    observer: str | None = "minmax"
    num_bits: int = 8
    type: str = "float"
    symmetric: bool = True
    group_size: int | None = None
    block_structure: list[int] | None = None
    actorder: str | None = None
    observer_kwargs: dict = field(default_factory=dict)
    scale_dtype: str | None = None   # None: the scales have the weight's dtype
    zp_dtype: str | None = None      # None for symmetric schemes (no zero points are stored)

    def to_dict(self) -> dict[str, Any]:
        """compressed-tensors 0.19's fields (what llm-compressor 0.14 writes)."""
        return {
            "num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
            "group_size": self.group_size, "strategy": self.strategy,
            "block_structure": self.block_structure, "dynamic": self.dynamic,
            "actorder": self.actorder, "scale_dtype": self.scale_dtype, "zp_dtype": self.zp_dtype,
            "observer": self.observer, "observer_kwargs": dict(self.observer_kwargs),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizationArgs":
        strategy = d.get("strategy")
        if strategy is None:  # compressed-tensors infers it from group_size
            gs = d.get("group_size")
            strategy = "tensor" if gs is None else ("channel" if gs == -1 else "group")
        return cls(
            strategy=str(strategy).lower(), dynamic=bool(d.get("dynamic", False)),
            observer=d.get("observer"), num_bits=int(d.get("num_bits", 8)),
            type=str(d.get("type", "int")).lower(), symmetric=bool(d.get("symmetric", True)),
            group_size=d.get("group_size"), block_structure=d.get("block_structure"),
            actorder=d.get("actorder"), observer_kwargs=dict(d.get("observer_kwargs") or {}),
            scale_dtype=d.get("scale_dtype"), zp_dtype=d.get("zp_dtype"),
        )

    @property
    def is_fp8(self) -> bool:
        return self.type == "float" and self.num_bits == 8


@dataclass(frozen=True)
class FP8Scheme:
    """A named preset: how weights are scaled and whether activation scales are static."""

    name: str
    weights: QuantizationArgs
    input_activations: QuantizationArgs

    @property
    def static_input(self) -> bool:
        return not self.input_activations.dynamic


SCHEME_NAMES = ("fp8-dynamic", "fp8")


def fp8_scheme(name: str, observer: str = "mse") -> FP8Scheme:
    """`fp8-dynamic`: channel weights + per-token dynamic inputs (FP8_DYNAMIC preset).
    `fp8`: per-tensor weights + static per-tensor input scales (FP8 preset)."""
    if name == "fp8-dynamic":
        return FP8Scheme(
            name, QuantizationArgs("channel", observer=observer),
            QuantizationArgs("token", dynamic=True, observer=None),
        )
    if name == "fp8":
        # herd's calibration keeps the true running max of the inputs: compressed-tensors' static_minmax
        return FP8Scheme(
            name, QuantizationArgs("tensor", observer=observer),
            QuantizationArgs("tensor", dynamic=False, observer="static_minmax"),
        )
    raise ValueError(f"unknown scheme {name!r}; expected one of {SCHEME_NAMES}")


def build_quantization_config(scheme: FP8Scheme, ignore: Iterable[str]) -> dict[str, Any]:
    """The `quantization_config` block of config.json, as llm-compressor writes it."""
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": scheme.weights.to_dict(),
                "input_activations": scheme.input_activations.to_dict(),
                "output_activations": None,
                "format": FLOAT_QUANTIZED,
            }
        },
        "format": FLOAT_QUANTIZED,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": FORMAT_VERSION,
    }


# herd's fused module suffix -> the HF modules (checkpoint names) stacked in it
FUSED_TO_HF = {
    ".self_attn.qkv_proj": (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj"),
    ".gate_up_proj": (".gate_proj", ".up_proj"),
}


# Dense Llama 1-3 checkpoints (and llm-compressor recipes for them) call a decoder layer's FFN
# `mlp`, where herd's decoder (Llama 4's layout) says `feed_forward`.
DENSE_LLAMA_ARCHS = frozenset({"LlamaForCausalLM"})
_HERD_FFN = re.compile(r"((?:^|\.)layers\.\d+)\.feed_forward\.")


def checkpoint_ffn_name(hf_config) -> str:
    """What the checkpoint calls herd's `feed_forward` (`hf_config`: herd's Llama4TextConfig)."""
    return "mlp" if getattr(hf_config, "architecture", None) in DENSE_LLAMA_ARCHS else "feed_forward"


def herd_to_hf_modules(name: str, hf_prefix: str = "", num_experts: int | None = None,
                       ffn: str = "feed_forward") -> list[str]:
    """HF module names behind herd module `name` (`hf_prefix`: "language_model." for a multimodal
    checkpoint; `ffn`: checkpoint_ffn_name). A FusedMoE (`...feed_forward.experts`) needs `num_experts`."""
    if ffn != "feed_forward":
        name = _HERD_FFN.sub(rf"\1.{ffn}.", name)
    if name.endswith(".experts"):
        if num_experts is None:
            raise ValueError(f"{name}: num_experts is needed to name the per-expert modules")
        projs = ("gate_proj", "up_proj", "down_proj")
        return [f"{hf_prefix}{name}.{e}.{p}" for e in range(num_experts) for p in projs]
    for suffix, hf_suffixes in FUSED_TO_HF.items():
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            return [hf_prefix + base + s for s in hf_suffixes]
    return [hf_prefix + name]


def match_name(name: str, pattern: str) -> bool:
    """compressed-tensors matching: `re:` patterns use re.match (anchored at the start only),
    anything else must equal the module name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern


def is_ignored(name: str, ignore: Iterable[str]) -> bool:
    return any(match_name(name, p) for p in ignore)


@dataclass
class CompressedTensorsFP8Config:
    """What herd needs from a compressed-tensors FP8 checkpoint's config.json."""

    weights: QuantizationArgs
    input_activations: QuantizationArgs | None
    targets: list[str]
    ignore: list[str]
    format: str = FLOAT_QUANTIZED
    kv_cache_scheme: dict | None = None

    @property
    def weight_strategy(self) -> str:
        return self.weights.strategy

    @property
    def is_static_input(self) -> bool:
        """True when the checkpoint carries `input_scale` tensors (static per-tensor activations)."""
        return self.input_activations is not None and not self.input_activations.dynamic

    @property
    def is_weight_only(self) -> bool:
        return self.input_activations is None

    def is_ignored(self, module_name: str) -> bool:
        """True when `module_name` (HF naming) stays unquantized. Exact names and `re:` regexes."""
        return is_ignored(module_name, self.ignore)

    def is_quantized(self, module_name: str) -> bool:
        return not self.is_ignored(module_name)

    def is_layer_skipped(self, prefix: str, hf_prefix: str = "", num_experts: int | None = None,
                         ffn: str = "feed_forward") -> bool:
        """Whether herd module `prefix` (fused names: qkv_proj, gate_up_proj, experts) stays unquantized.
        All HF modules stacked in it must agree, as vLLM requires."""
        shards = herd_to_hf_modules(prefix, hf_prefix, num_experts, ffn)
        skipped = {s: self.is_ignored(s) for s in shards}
        if len(set(skipped.values())) > 1:
            raise ValueError(f"{prefix}: its parts must be all quantized or all ignored, got {skipped}")
        return skipped[shards[0]]

    @classmethod
    def from_config(cls, hf_config: dict[str, Any]) -> "CompressedTensorsFP8Config | None":
        """None unless config.json declares compressed-tensors; ValueError if it is compressed-tensors
        but not an FP8 (float, 8-bit) scheme herd can run."""
        qc = hf_config.get("quantization_config") or hf_config.get("compression_config")
        if not qc and isinstance(hf_config.get("text_config"), dict):
            qc = hf_config["text_config"].get("quantization_config")
        if not qc or qc.get("quant_method") != QUANT_METHOD:
            return None
        fmt = qc.get("format")
        if fmt not in (FLOAT_QUANTIZED, "naive-quantized"):
            raise ValueError(f"compressed-tensors format {fmt!r} is not supported (only {FLOAT_QUANTIZED!r})")
        groups = [
            g for g in (qc.get("config_groups") or {}).values()
            # vLLM drops groups that only target attention modules (KV-cache schemes)
            if not (len(g.get("targets", [])) == 1 and g["targets"][0].endswith("Attention"))
        ]
        if len(groups) != 1:
            raise ValueError(f"expected one compressed-tensors config group, found {len(groups)}")
        group = groups[0]
        if not group.get("weights"):
            raise ValueError("compressed-tensors config group has no weights scheme")
        weights = QuantizationArgs.from_dict(group["weights"])
        inputs = group.get("input_activations")
        inputs = QuantizationArgs.from_dict(inputs) if inputs else None
        if not weights.is_fp8 or (inputs is not None and not inputs.is_fp8):
            raise ValueError(
                f"only FP8 (float, 8-bit) compressed-tensors checkpoints are supported, got weights "
                f"{weights.type}{weights.num_bits}"
            )
        if weights.strategy not in ("channel", "tensor", "block") or weights.dynamic or not weights.symmetric:
            raise ValueError(f"unsupported FP8 weight scheme: strategy={weights.strategy} dynamic={weights.dynamic}")
        return cls(
            weights=weights, input_activations=inputs, targets=list(group.get("targets") or []),
            ignore=list(qc.get("ignore") or []), format=fmt, kv_cache_scheme=qc.get("kv_cache_scheme"),
        )


def read_compressed_config(path: str) -> CompressedTensorsFP8Config | None:
    """Parse `path/config.json` (or a config.json path); None if it is not a compressed-tensors checkpoint."""
    cfg_path = path if path.endswith(".json") else os.path.join(path, "config.json")
    with open(cfg_path) as f:
        return CompressedTensorsFP8Config.from_config(json.load(f))


def is_compressed_fp8_checkpoint(path: str) -> bool:
    return read_compressed_config(path) is not None
