"""INC node vocabulary: op types and their stats layout, class names, file names, and the
mapping from herd module names to the node names vLLM-HPU gives the same tensors.

herd and vLLM share the linear names (qkv_proj, o_proj, gate_up_proj, down_proj, router, lm_head).
What differs is where the fused ops live: vLLM-HPU replaces FusedMoE's weights with
`experts.moe_op` (one `w13_list.<e>` / `w2_list.<e>` MoeMatmul per local expert), and its attention
impl `self_attn.attn.impl` holds the KV cache (`k_cache`, `v_cache`) and the attention matmuls
(`matmul_qk`, `softmax`, `matmul_av`, `batch2block_matmul`, `block2batch_matmul`,
`fused_scaled_dot_product_attention`). Multimodal checkpoints prefix `language_model.`; dense
Llama 1-3 call the FFN `mlp` where herd (Llama 4's layout) says `feed_forward`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType


@dataclass(frozen=True)
class NodeType:
    name: str
    num_inputs: int
    has_weight: bool
    num_outputs: int          # for dynamic_moe: 1 + number of local experts
    required_output: bool     # outputs recorded even under measure_exclude OUTPUT


NODE_TYPES = MappingProxyType({t.name: t for t in (
    NodeType("linear", 1, True, 1, False),
    NodeType("row_parallel_linear", 1, True, 2, True),
    NodeType("matmul", 2, False, 1, False),
    NodeType("b2b_matmul", 2, False, 1, True),
    NodeType("kv_cache", 1, False, 1, False),
    NodeType("softmax", 1, False, 1, True),
    NodeType("fused_sdpa", 3, False, 2, True),
    NodeType("dynamic_moe", 1, False, 1, True),
    NodeType("embedding", 1, True, 1, False),
)})

# Patched-module table (INC class name -> op type) and the classes that support dynamic quantization.
INC_CLASSES = MappingProxyType({
    **dict.fromkeys(["Linear", "FalconLinear", "LoRACompatibleLinear", "ColumnParallelLinear",
                     "MergedColumnParallelLinear", "QKVParallelLinear", "ReplicatedLinear", "ParallelLMHead",
                     "Conv2d", "LoRACompatibleConv", "MoeMatmul", "MoeFP8Matmul", "GaudiFP8Linear",
                     "LinearLayer", "LinearAllreduce", "ScopedLinearAllReduce", "LmHeadLinearAllreduce"],
                    "linear"),
    "RowParallelLinear": "row_parallel_linear",
    "Matmul": "matmul",
    "B2BMatmul": "b2b_matmul",
    "KVCache": "kv_cache",
    "VLLMKVCache": "kv_cache",
    "Softmax": "softmax",
    "BlockSoftmaxConstMax": "softmax",
    "ModuleFusedSDPA": "fused_sdpa",
    **dict.fromkeys(["VllmMixtureOfExpertsOp", "VllmMixtureOfExpertsOpFP8", "VllmMixtureOfExpertsOpFP8PerChannel",
                     "GaudiMixtralSparseMoeBlock", "GaudiDeepseekV3MoE"], "dynamic_moe"),
})
NOT_DYNAMIC = frozenset({"KVCache", "Softmax", "BlockSoftmaxConstMax", "ModuleFusedSDPA", "Conv2d",
                         "LoRACompatibleConv", "GaudiMixtralSparseMoeBlock", "GaudiDeepseekV3MoE"})

MOE_OP_CLASS = "VllmMixtureOfExpertsOp"
MOE_EXPERT_CLASS = "MoeMatmul"
KV_CACHE_CLASS = "VLLMKVCache"
MULTIMODAL_PREFIX = "language_model."
# INC patches these but records nothing for them (FusedMoE only drops its bf16 weights); they are
# listed in `_mod_list.json` like INC lists them.
PATCHED_ONLY_CLASSES = frozenset({"FusedMoE", "SharedFusedMoE"})

# vLLM-HPU's attention impl (HPUAttentionImpl): child name -> INC class. herd measures the first
# five from its own attention; the last three exist only in vLLM-HPU's flat paged attention and
# fused SDPA kernel, whose internal values herd does not reproduce, so the QUANT_CONFIGs herd writes
# blocklist them (they then run in bf16 on Gaudi).
ATTENTION_OPS = MappingProxyType({
    "k_cache": KV_CACHE_CLASS, "v_cache": KV_CACHE_CLASS,
    "matmul_qk": "Matmul", "softmax": "Softmax", "matmul_av": "Matmul",
    "batch2block_matmul": "Matmul", "block2batch_matmul": "Matmul",
    "fused_scaled_dot_product_attention": "ModuleFusedSDPA",
})
HERD_MEASURED_ATTENTION_OPS = ("k_cache", "v_cache", "matmul_qk", "softmax", "matmul_av")
UNMEASURED_ATTENTION_OPS = ("batch2block_matmul", "block2batch_matmul", "fused_scaled_dot_product_attention")
DENSE_LLAMA_ARCHS = frozenset({"LlamaForCausalLM"})

_HERD_LINEARS = ("QKVParallelLinear", "MergedColumnParallelLinear", "ColumnParallelLinear",
                 "ReplicatedLinear", "ParallelLMHead", "RowParallelLinear", "Linear")
_HERD_MOE = ("FusedMoE", "SharedFusedMoE")
_EXPERT_RE = re.compile(r"^(?P<moe>.*)\.moe_op\.(?P<w>w13|w2)_list\.(?P<e>\d+)$")
_IMPL_RE = re.compile(r"^(?P<attn>.*)\.impl\.(?P<op>\w+)$")
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_HERD_FFN = re.compile(r"((?:^|\.)layers\.\d+)\.feed_forward\.")
_VLLM_MLP = re.compile(r"((?:^|\.)layers\.\d+)\.mlp\.")


@dataclass(frozen=True)
class NodeNaming:
    """How vLLM names herd's modules for one checkpoint: `prefix` is "language_model." for
    Llama4ForConditionalGeneration, `mlp` is "mlp" for dense Llama 1-3 (vLLM's LlamaMLP)."""
    prefix: str = ""
    mlp: str = "feed_forward"

    @classmethod
    def for_model(cls, hf_config) -> "NodeNaming":
        """From herd's Llama4TextConfig (or anything with .multimodal / .architecture)."""
        prefix = MULTIMODAL_PREFIX if getattr(hf_config, "multimodal", False) else ""
        dense = getattr(hf_config, "architecture", None) in DENSE_LLAMA_ARCHS
        return cls(prefix, "mlp" if dense else "feed_forward")

    def inc_name(self, herd_name: str) -> str:
        name = _HERD_FFN.sub(rf"\1.{self.mlp}.", herd_name) if self.mlp != "feed_forward" else herd_name
        return self.prefix + name


@dataclass(frozen=True)
class IncNode:
    name: str          # INC node name (what the measurement file is keyed by)
    class_name: str    # INC class name (allow/block `types`, dict-form `layer_types`)
    type: str          # op type (NODE_TYPES key)
    module: str        # herd module the tensors come from
    role: str          # linear | moe | w13 | w2 | k_cache | v_cache
    expert: int | None = None
    num_experts: int | None = None

    @property
    def num_outputs(self) -> int:
        return 1 + self.num_experts if self.type == "dynamic_moe" else NODE_TYPES[self.type].num_outputs


def inc_nodes_for_module(name: str, class_name: str, num_local_experts: int | None = None,
                         prefix: "str | NodeNaming" = "") -> list[IncNode]:
    """INC nodes measured for one herd module (empty for modules INC does not patch, e.g. norms).
    `prefix` is a NodeNaming, or just the name prefix ("language_model." for
    Llama4ForConditionalGeneration checkpoints)."""
    naming = prefix if isinstance(prefix, NodeNaming) else NodeNaming(prefix)
    full = naming.inc_name(name)
    if class_name in _HERD_LINEARS:
        return [IncNode(full, class_name, INC_CLASSES[class_name], name, "linear")]
    if class_name in _HERD_MOE:
        if not num_local_experts:
            raise ValueError(f"{name}: num_local_experts is needed to name the MoE nodes")
        moe = f"{full}.moe_op"
        nodes = [IncNode(moe, MOE_OP_CLASS, "dynamic_moe", name, "moe", num_experts=num_local_experts)]
        for w in ("w13", "w2"):
            nodes += [IncNode(f"{moe}.{w}_list.{e}", MOE_EXPERT_CLASS, "linear", name, w, expert=e)
                      for e in range(num_local_experts)]
        return nodes
    if name.endswith("self_attn.attn"):
        return [IncNode(f"{full}.impl.{op}", ATTENTION_OPS[op], INC_CLASSES[ATTENTION_OPS[op]], name, op)
                for op in HERD_MEASURED_ATTENTION_OPS]
    return []


def herd_target(inc_name: str) -> tuple[str, str, int | None]:
    """Inverse mapping: INC node name -> (herd module name, role, expert index). Dense Llama's
    `layers.N.mlp.` is herd's `layers.N.feed_forward.` (Llama 4 layers have no `mlp`)."""
    name = inc_name[len(MULTIMODAL_PREFIX):] if inc_name.startswith(MULTIMODAL_PREFIX) else inc_name
    name = _VLLM_MLP.sub(r"\1.feed_forward.", name)
    m = _EXPERT_RE.match(name)
    if m:
        return m["moe"], m["w"], int(m["e"])
    if name.endswith(".moe_op"):
        return name[: -len(".moe_op")], "moe", None
    m = _IMPL_RE.match(name)
    if m:
        return m["attn"], m["op"], None
    return name, "linear", None


def node_weight(model, node: IncNode):
    """The rank-local weight tensor [out, in] behind an INC node of a herd model (None if it has none)."""
    module = model.get_submodule(node.module)
    if node.role == "w13":
        return module.w13_weight[node.expert]
    if node.role == "w2":
        return module.w2_weight[node.expert]
    return getattr(module, "weight", None) if node.role == "linear" else None


_CLASS_BY_SUFFIX = (
    (re.compile(r"\.moe_op$|\.MoeOp$"), MOE_OP_CLASS),
    (re.compile(r"\.(w13|w2)_list\.\d+$"), MOE_EXPERT_CLASS),
    (re.compile(r"\.(k_cache|v_cache|latent_cache_k)$"), KV_CACHE_CLASS),
    (re.compile(r"\.(matmul_qk|matmul_av)$"), "Matmul"),
    (re.compile(r"\.(batch2block_matmul|block2batch_matmul)$"), "B2BMatmul"),
    (re.compile(r"\.softmax$"), "Softmax"),
    (re.compile(r"\.fused_scaled_dot_product_attention$"), "ModuleFusedSDPA"),
    (re.compile(r"(^|\.)qkv_proj$"), "QKVParallelLinear"),
    (re.compile(r"(^|\.)(o_proj|down_proj)$"), "RowParallelLinear"),
    (re.compile(r"(^|\.)gate_up_proj$"), "MergedColumnParallelLinear"),
    (re.compile(r"(^|\.)router$"), "ReplicatedLinear"),
    (re.compile(r"(^|\.)lm_head$"), "ParallelLMHead"),
)


def infer_node_class(name: str, has_weight: bool, num_outputs: int | None) -> tuple[str, str]:
    """(class name, op type) of a node known only by its name and stats layout (a loaded file)."""
    for pattern, cls in _CLASS_BY_SUFFIX:
        if pattern.search(name):
            op = INC_CLASSES[cls]
            if op == "b2b_matmul" and not num_outputs:
                return "Matmul", "matmul"
            return cls, op
    if has_weight:
        return ("RowParallelLinear", "row_parallel_linear") if num_outputs == 2 else ("Linear", "linear")
    raise ValueError(f"cannot tell the op type of node {name!r} from its name")


def is_selected(name: str, class_name: str, config) -> bool:
    """INC's should_quantize: patched type, allowlist (empty = all), blocklist, dynamic support."""
    if (class_name not in INC_CLASSES and class_name not in PATCHED_ONLY_CLASSES) \
            or class_name in config.blocklist.types:
        return False
    allow = config.allowlist
    if not allow.empty and class_name not in allow.types and not allow.matches_name(name):
        return False
    if config.blocklist.matches_name(name):
        return False
    return not (config.dynamic_quantization and class_name in NOT_DYNAMIC)


# ---- file names (spec A4) -----------------------------------------------------------------------
def rank_suffix(rank: int | None, world_size: int | None) -> str:
    """`_<rank>_<world>`, or "" without a distributed context."""
    return "" if rank is None or world_size is None else f"_{rank}_{world_size}"


def measurement_stem(prefix: str | Path, observer: str = "maxabs", rank: int | None = None,
                     world_size: int | None = None) -> str:
    return f"{prefix}_hooks_{observer}{rank_suffix(rank, world_size)}"


def scale_stem(prefix: str | Path, method_name: str, observer: str = "maxabs", rank: int | None = None,
               world_size: int | None = None) -> str:
    return f"{prefix}_hooks_{observer}_{method_name}{rank_suffix(rank, world_size)}"


def rank_stems(make_stem, rank: int | None, world_size: int | None, separate: bool = True) -> list[str]:
    """Stems a rank's file may have, the one to write first. vLLM-HPU always runs under
    torch.distributed, so INC there names even a single rank's files `_0_1`; INC without a
    distributed context (and herd before) leaves the suffix out. herd writes `_0_1` and reads both.
    `make_stem(rank, world)` builds a stem; `separate` is QUANT_CONFIG `seperate_measure_files`."""
    if not separate:
        return [make_stem(None, None)]
    if rank is None or world_size is None:
        rank, world_size = 0, 1
    stems = [make_stem(rank, world_size)]
    if world_size == 1:
        stems.append(make_stem(None, None))
    return stems


def find_rank_file(stems: list[str], ext: str = ".npz") -> Path | None:
    """The first of `stems` + ext that exists."""
    return next((Path(s + ext) for s in stems if Path(s + ext).exists()), None)


def find_measurement_sets(prefix: str | Path, observer: str = "maxabs") -> dict[int, dict[int, Path]]:
    """{world_size: {rank: file}} of the measurement files under a prefix (NPZ preferred over JSON,
    `_0_1` over an unsuffixed file; scale caches such as `_hooks_maxabs_MAXABS_HW_0_8` do not
    match). An unsuffixed file counts as rank 0 of world size 1."""
    prefix = Path(prefix)
    folder = prefix.parent if str(prefix.parent) else Path(".")
    pat = re.compile(rf"^{re.escape(prefix.name)}_hooks_{re.escape(observer)}(?:_(\d+)_(\d+))?\.(npz|json)$")
    sets: dict[int, dict[int, tuple[tuple[bool, bool], Path]]] = {}
    if not folder.is_dir():
        return {}
    for path in sorted(folder.iterdir()):
        m = pat.match(path.name)
        if not m:
            continue
        rank, world = (int(m[1]), int(m[2])) if m[1] is not None else (0, 1)
        rank_of = sets.setdefault(world, {})
        key = (m[1] is not None, path.suffix == ".npz")   # suffixed first, then npz
        if rank not in rank_of or key > rank_of[rank][0]:
            rank_of[rank] = (key, path)
    return {w: {r: p for r, (_, p) in ranks.items()} for w, ranks in sets.items()}
