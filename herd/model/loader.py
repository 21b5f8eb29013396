"""Load Hugging Face Llama 4 checkpoints (sharded safetensors) into herd's model.

Handles `language_model.` prefixes of Llama4ForConditionalGeneration, fused experts
(gate_up_proj [E, D, 2I], down_proj [E, I, D], stored [in, out]) and per-expert tensors
(experts.N.{gate,up,down}_proj.weight, [out, in]). Each tensor goes to its parameter's
`weight_loader`, which takes this rank's slice, so TP ranks never hold the whole model.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from herd.model.config import Llama4TextConfig
from herd.model.layers import copy_checked
from herd.model.llama4 import Llama4ForCausalLM, QuantMethods
from herd.parallel.context import SINGLE, TPContext

# Tensors of the multimodal checkpoint that the text model does not use (loaded by the vision tower).
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")
_STACKED = {  # HF module suffix -> (herd module suffix, shard id)
    ".self_attn.q_proj": (".self_attn.qkv_proj", "q"),
    ".self_attn.k_proj": (".self_attn.qkv_proj", "k"),
    ".self_attn.v_proj": (".self_attn.qkv_proj", "v"),
    ".gate_proj": (".gate_up_proj", 0),
    ".up_proj": (".gate_up_proj", 1),
}
# Per-expert tensors: weight, and for FP8 checkpoints weight_scale / input_scale.
_PER_EXPERT = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\."
                         r"(weight|weight_scale|input_scale)$")
_EXPERT_SHARD = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# HF Llama 1-3 name the dense FFN `mlp`; herd's decoder layer (Llama 4's layout) calls it `feed_forward`.
_DENSE_LLAMA_MLP = re.compile(r"^(model\.layers\.\d+)\.mlp\.")
_LEAVES = ("weight", "weight_scale", "input_scale")
logger = logging.getLogger(__name__)


def checkpoint_files(path) -> list[str]:
    path = os.fspath(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return found


def iterate_checkpoint(path: str, desc: str = "Loading weights") -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(path)
    names = []
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            names.extend((fn, k) for k in f.keys())
    handles = {}
    try:
        for fn, key in tqdm(names, desc=desc, unit="tensor", leave=False, disable=None):
            if fn not in handles:
                handles[fn] = safe_open(fn, framework="pt")
            yield key, handles[fn].get_tensor(key)
    finally:
        handles.clear()


def checkpoint_shapes(path) -> dict[str, list[int]]:
    """Tensor shapes from the safetensors headers (no data is read)."""
    shapes = {}
    for fn in checkpoint_files(path):
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                shapes[k] = f.get_slice(k).get_shape()
    return shapes


def expand_tensor_scales(weights, shapes: dict[str, list[int]]):
    """Per-tensor FP8 weight scales become per-channel [rows, 1] so fused layers (q/k/v, gate/up)
    can keep one scale per output row whatever each part's scale was."""
    for name, t in weights:
        if name.endswith(".weight_scale") and t.numel() == 1:
            wshape = shapes.get(name[: -len("_scale")])
            if wshape is not None and len(wshape) == 2:
                t = t.reshape(1, 1).expand(wshape[0], 1).contiguous()
        yield name, t


def _strip(name: str, keep_vision: bool = False) -> str | None:
    if name.startswith("language_model."):
        name = name[len("language_model."):]
    if name.startswith(_VISION_PREFIXES):
        return name if keep_vision else None
    if name.endswith(".rotary_emb.inv_freq"):  # a buffer some older HF Llama checkpoints saved
        return None
    return _DENSE_LLAMA_MLP.sub(r"\1.feed_forward.", name)


def load_weights(model: Llama4ForCausalLM, weights: Iterator[tuple[str, torch.Tensor]],
                 strict: bool = True) -> set[str]:
    """Route checkpoint tensors to parameters; return the set of parameters that were filled."""
    params = dict(model.named_parameters())
    filled: dict[str, set] = {}
    unexpected = []

    def put(pname, tensor, shard=None, expert_id=None):
        if pname not in params:
            unexpected.append(pname)
            return
        param = params[pname]
        loader = getattr(_owner(model, pname), "weight_loader", None)
        try:
            if loader is None:
                copy_checked(param, tensor)
            elif expert_id is not None:
                loader(param, tensor, shard, expert_id)
            else:
                loader(param, tensor, shard)
        except (RuntimeError, ValueError) as err:  # narrow() on a wrong shape raises RuntimeError
            raise ValueError(f"shape mismatch loading {pname} (shard {shard}): checkpoint tensor "
                             f"{tuple(tensor.shape)} does not fit parameter {tuple(param.shape)}: {err}") from None
        filled.setdefault(pname, set()).add((shard, expert_id))

    keep_vision = hasattr(model, "vision_model")
    for name, tensor in weights:
        name = _strip(name, keep_vision)
        if name is None:
            continue
        if name.startswith(_VISION_PREFIXES):  # HF names as they are (unfused, unquantized)
            put(name, tensor)
            continue
        if name.endswith(".feed_forward.experts.gate_up_proj"):
            pname = name.replace("gate_up_proj", "w13_weight")
            inter = tensor.shape[-1] // 2
            for e in range(tensor.shape[0]):
                put(pname, tensor[e, :, :inter].t(), "w1", expert_id=e)
                put(pname, tensor[e, :, inter:].t(), "w3", expert_id=e)
            continue
        if name.endswith(".feed_forward.experts.down_proj"):
            pname = name.replace("down_proj", "w2_weight")
            for e in range(tensor.shape[0]):
                put(pname, tensor[e].t(), "w2", expert_id=e)
            continue
        m = _PER_EXPERT.match(name)
        if m:
            prefix, e, proj, leaf = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            pname = f"{prefix}.{'w2' if proj == 'down_proj' else 'w13'}_{leaf}"
            if leaf == "input_scale":
                merge_scale(params.get(pname), tensor, e, pname, unexpected)
                filled.setdefault(pname, set()).add((proj, e))
            else:
                put(pname, tensor, _EXPERT_SHARD[proj], expert_id=e)
            continue
        module, _, leaf = name.rpartition(".")
        for suffix, (new, shard) in _STACKED.items():
            if module.endswith(suffix) and leaf in _LEAVES:
                pname = f"{module[: -len(suffix)]}{new}.{leaf}"
                if leaf == "input_scale":  # one scale for the fused input: the max of the parts
                    merge_scale(params.get(pname), tensor, None, pname, unexpected)
                    filled.setdefault(pname, set()).add((shard, None))
                else:
                    put(pname, tensor, shard)
                break
        else:
            if leaf == "input_scale":
                merge_scale(params.get(name), tensor, None, name, unexpected)
                filled.setdefault(name, set()).add((None, None))
            else:
                put(name, tensor)
    if model.config.tie_word_embeddings and "lm_head.weight" not in filled:
        emb = model.model.embed_tokens.weight
        params["lm_head.weight"].data.copy_(emb.data)
        filled["lm_head.weight"] = {(None, None)}
    if strict:
        if unexpected:
            raise ValueError(f"checkpoint has {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}")
        missing = [n for n in params if n not in filled]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    return set(filled)


def merge_scale(param, tensor, expert_id, pname, unexpected):
    """Static activation scales of layers that share an input are merged by max."""
    if param is None:
        unexpected.append(pname)
        return
    dst = param.data if expert_id is None else param.data[expert_id]
    dst.copy_(torch.maximum(dst, tensor.reshape(dst.shape).to(dst.dtype)))


def _owner(model, pname):
    return model.get_submodule(pname.rsplit(".", 1)[0])


def process_weights_after_loading(model: torch.nn.Module):
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


def load_model(path: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               tp: TPContext = SINGLE, quant: QuantMethods | None = None, expert_parallel: bool = False,
               config: Llama4TextConfig | None = None, weights=None,
               multimodal: bool = False) -> Llama4ForCausalLM:
    """Build on CPU, load and (optionally) quantize there, then move to the device.

    multimodal=True also loads the vision tower and projector of a Llama4ForConditionalGeneration
    checkpoint (herd.model.mllama4); otherwise their tensors are skipped."""
    cfg = config or Llama4TextConfig.from_pretrained(path)
    with torch.device("cpu"):
        if multimodal and cfg.multimodal and cfg.raw.get("vision_config") is not None:
            from herd.model.mllama4 import Llama4ForConditionalGeneration
            klass = Llama4ForConditionalGeneration
        else:
            klass = Llama4ForCausalLM
        model = klass(cfg, dtype=dtype, tp=tp, quant=quant, expert_parallel=expert_parallel)
    if weights is None:
        size = sum(os.path.getsize(f) for f in checkpoint_files(path))
        logger.info("loading weights from %s (%.0f MB)", path, size / 1e6)
        weights = expand_tensor_scales(iterate_checkpoint(path), checkpoint_shapes(path))
    load_weights(model, weights)
    process_weights_after_loading(model)
    if quant is not None:
        quant.post_load(model)
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":
        relayout_for_cpu(model)
    return model


def _move_to_hugepages(moves: list[tuple[torch.nn.Parameter, bool]]):
    """Copy each weight into one buffer on 2 MiB pages, K-major (the same logical [..., N, K]
    tensor with last two strides (1, k_major_stride(N))) where asked, row-major otherwise; one
    weight at a time, so the old copies are freed as the new ones fill."""
    from herd.ops.cpu import k_major_storage, k_major_view
    from herd.ops.cpu.memory import hugepage_zeros
    align = 64
    seen: set[int] = set()
    moves = [(p, k) for p, k in moves if not (id(p) in seen or seen.add(id(p)))]  # shared weights once
    if not moves:
        return
    shapes = [k_major_storage(p.shape, p.element_size()) if k else tuple(p.shape) for p, k in moves]
    nbytes = [math.prod(shape) * p.element_size() for (p, _), shape in zip(moves, shapes)]
    arena = hugepage_zeros((sum(-(-n // align) * align for n in nbytes),), torch.uint8)
    offset = 0
    for (p, k_major), shape, n in zip(moves, shapes, nbytes):
        buf = arena[offset:offset + n].view(p.dtype).view(shape)
        offset += -(-n // align) * align
        dst = k_major_view(buf, p.shape[-2]) if k_major else buf
        dst.copy_(p.data)
        p.data = dst


def relayout_for_cpu(model: torch.nn.Module):
    """Unquantized expert weights [E, N, K], and fp32 dense linear weights [N, K], stored K-major:
    herd's CPU kernels (herd/ops/cpu) stream each weight's [K, N] block in long contiguous runs
    at decode batch sizes, and torch's grouped GEMM also runs the experts faster that way than
    through the row-major layout's transposed view. Embeddings keep their rows contiguous (the
    lm_head is its own tensor even when tied). Every weight moved here (bf16 dense linears keep
    their layout but move too) lands in one buffer on 2 MiB pages (herd.ops.cpu.memory), since
    a decode step streams all of them. K rows are padded to an odd number of cache lines
    (herd.ops.cpu.k_major_stride)."""
    from herd.model.layers import LinearBase, ParallelLMHead, UnquantizedLinearMethod
    from herd.model.llama4 import FusedMoE
    from herd.ops.cpu import kernels_available
    kernel_dtypes = (torch.float32, torch.bfloat16)  # what herd's kernels read
    used = False
    moves: list[tuple[torch.nn.Parameter, bool]] = []  # (weight, store K-major)
    for module in model.modules():
        if isinstance(module, FusedMoE):
            for name in ("w13_weight", "w2_weight"):
                p = getattr(module, name)
                if p.dtype in (torch.float32, torch.bfloat16, torch.float16) and p.dim() == 3 and p.stride(-1) == 1:
                    moves.append((p, True))
                    used |= p.dtype in kernel_dtypes
        elif isinstance(module, (LinearBase, ParallelLMHead)) and type(module.quant_method) is UnquantizedLinearMethod:
            p = module.weight
            # bf16 stays row-major (F.linear): torch's bf16 GEMM beats the kernel from a few rows
            # up, and runs slower on K-major weights; only bf16 experts take the kernel
            if p.dim() == 2 and p.stride(-1) == 1 and p.dtype in (torch.float32, torch.bfloat16):
                moves.append((p, p.dtype == torch.float32))
                used |= p.dtype == torch.float32
    _move_to_hugepages(moves)
    if used:
        kernels_available()  # build (or find) the kernels now, while loading, not in the first step
