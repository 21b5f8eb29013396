"""One-shot FP8 export of a HF Llama 4 checkpoint to the compressed-tensors format.

Works on the safetensors files directly, one tensor (or one expert) at a time, and writes output
shards as they fill up: peak memory is about one output shard plus one source tensor, whatever the
model size. Every Linear weight not matched by the ignore list becomes an FP8 `weight` plus a
`weight_scale`; the fused routed experts are split per expert into [out, in] Linears first, as
llm-compressor does for Llama 4 (see compressed_experts.py).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from herd.quant.compressed_tensors.config import (
    DEFAULT_IGNORE,
    build_quantization_config,
    fp8_scheme,
    is_ignored,
    match_name,
)
from herd.quant.compressed_tensors.experts import expert_module_names, fused_expert_param, split_expert
from herd.quant.compressed_tensors.reader import INDEX_FILE, SafetensorsFolder
from herd.quant.observers import OBSERVERS, quantize_weight, scale_from_amax

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# 2-D `.weight` tensors that belong to modules other than nn.Linear
NON_LINEAR_MODULES = ("embed_tokens",)
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def is_linear_weight(name: str, shape: list[int] | tuple[int, ...]) -> bool:
    """True for the weight of an nn.Linear of a Llama 4 checkpoint (by name and rank)."""
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    module = name[: -len(".weight")].rsplit(".", 1)[-1]
    return module not in NON_LINEAR_MODULES and "norm" not in module and "embedding" not in module


class ShardWriter:
    """Buffers tensors into shards of at most `max_shard_bytes` (a larger tensor gets its own shard),
    then names them model-0000i-of-0000N.safetensors and writes the index."""

    def __init__(self, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written (temporary) shard
        self.total_bytes = 0

    def _tmp(self, i: int) -> str:
        return os.path.join(self.out_dir, f".shard-{i:05d}.tmp")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self._buffer:
            return
        save_file(self._buffer, self._tmp(len(self._shards)), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def abort(self) -> None:
        self._buffer = {}
        for i in range(len(self._shards)):
            if os.path.exists(self._tmp(i)):
                os.remove(self._tmp(i))

    def finish(self) -> list[str]:
        self.flush()
        n = len(self._shards)
        weight_map, files = {}, []
        for i, names in enumerate(self._shards):
            fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp(i), os.path.join(self.out_dir, fn))
            os.chmod(os.path.join(self.out_dir, fn), 0o644)  # safetensors writes 0600; others must read it
            weight_map.update((name, fn) for name in names)
            files.append(fn)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        return files


@dataclass
class QuantizeResult:
    output_path: str
    quantized: list[str] = field(default_factory=list)  # HF module names now in FP8
    ignored: list[str] = field(default_factory=list)  # Linear modules kept in the source dtype
    unused_ignore_patterns: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    tied_lm_head: str | None = None  # an LM head that shares the embedding (kept unquantized)


def tied_lm_head(hf_config: dict, tensor_names: Iterable[str]) -> str | None:
    """The LM head module of a checkpoint whose head is tied to the input embedding (no tensor of its
    own), or None. transformers builds it as an nn.Linear, so compressed-tensors' `Linear` target
    matches it: it must be named in `ignore`, or transformers expects a `weight_scale` for it."""
    text = hf_config.get("text_config") if isinstance(hf_config.get("text_config"), dict) else {}
    name = "language_model.lm_head" if text else "lm_head"
    tied = text.get("tie_word_embeddings", hf_config.get("tie_word_embeddings", True))
    return name if tied and f"{name}.weight" not in set(tensor_names) else None


def _source_units(folder: SafetensorsFolder, name: str) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(output name or module name, tensor, is_linear) for one source tensor; fused experts are
    read one expert at a time and come out as per-expert [out, in] Linear weights."""
    parsed = fused_expert_param(name)
    if parsed is not None:
        prefix, kind = parsed
        fused = folder.get_slice(name)
        for e in range(fused.get_shape()[0]):
            for module, w in zip(expert_module_names(prefix, kind, e), split_expert(kind, fused[e])):
                yield module, w, True
        return
    shape = folder.get_slice(name).get_shape()
    if is_linear_weight(name, shape):
        yield name[: -len(".weight")], folder.get(name), True
    else:
        yield name, folder.get(name), False


def linear_modules(folder: SafetensorsFolder) -> list[str]:
    """Every Linear module of the checkpoint in output naming (fused experts counted per expert),
    from names and shapes only."""
    out = []
    for name in folder.names():
        parsed = fused_expert_param(name)
        if parsed is not None:
            prefix, kind = parsed
            for e in range(folder.get_slice(name).get_shape()[0]):
                out.extend(expert_module_names(prefix, kind, e))
        elif is_linear_weight(name, folder.get_slice(name).get_shape()):
            out.append(name[: -len(".weight")])
    return out


def _check_output_dir(model_path: str, output_path: str) -> None:
    if os.path.abspath(model_path) == os.path.abspath(output_path):
        raise ValueError("the output folder must differ from the model folder")
    if os.path.isdir(output_path) and any(
        fn.endswith(".safetensors") or fn == INDEX_FILE for fn in os.listdir(output_path)
    ):
        raise FileExistsError(f"{output_path} already holds safetensors files; choose an empty folder")
    os.makedirs(output_path, exist_ok=True)


def _copy_side_files(model_path: str, output_path: str) -> None:
    """Tokenizer, generation config, chat template, processor files: everything but weights/config."""
    for fn in sorted(os.listdir(model_path)):
        src = os.path.join(model_path, fn)
        if not os.path.isfile(src) or fn in ("config.json", INDEX_FILE) or fn.endswith(WEIGHT_FILE_SUFFIXES):
            continue
        if fn.endswith(".index.json"):
            continue
        shutil.copy2(src, os.path.join(output_path, fn))


def quantize_checkpoint(
    model_path: str,
    output_path: str,
    scheme: str = "fp8-dynamic",
    ignore: Iterable[str] = DEFAULT_IGNORE,
    observer: str = "mse",
    input_amax: dict[str, float] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    device: str | torch.device = "cpu",
    progress: bool = True,
    hessians: dict[str, torch.Tensor] | None = None,
) -> QuantizeResult:
    """Write an FP8 compressed-tensors copy of the HF checkpoint at `model_path` to `output_path`.

    scheme "fp8-dynamic": per-channel weight scales, per-token dynamic activations (no data needed).
    scheme "fp8": per-tensor weight scales and static input scales from `input_amax`, a dict
    HF module name -> max |input| measured on calibration data (see compressed_calib.py).
    `ignore`: exact module names or `re:` regexes (re.match) of Linears to keep unquantized.
    `hessians`: HF module name -> calibration H = E[x x^T] (herd.quant.hessian); those weights are
    rounded with GPTQ error feedback instead of to nearest (same scales, same format).
    """
    fp8 = fp8_scheme(scheme, observer)
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; expected one of {OBSERVERS}")
    ignore = list(ignore)
    config_path = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {model_path}")
    with open(config_path) as f:
        hf_config = json.load(f)
    if hf_config.get("quantization_config"):
        method = hf_config["quantization_config"].get("quant_method", "unknown")
        raise ValueError(f"{model_path} is already quantized ({method}); start from the bf16 checkpoint")
    if fp8.static_input and input_amax is None:
        raise ValueError("scheme 'fp8' needs activation amax values from calibration (input_amax)")
    _check_output_dir(model_path, output_path)

    result = QuantizeResult(output_path)
    writer = ShardWriter(output_path, max_shard_bytes)
    used_patterns: set[str] = set()
    device = torch.device(device)
    with SafetensorsFolder(model_path) as folder:
        if fp8.static_input:
            _check_input_amax(input_amax, [m for m in linear_modules(folder) if not is_ignored(m, ignore)])
        names = folder.names()
        sizes = {n: _nbytes(folder, n) for n in names}
        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="quantize", disable=not progress)
        try:
            for name in names:
                bar.set_postfix_str(name[-48:], refresh=False)
                for out_name, tensor, is_linear in _source_units(folder, name):
                    if not is_linear:
                        writer.add(out_name, tensor)
                        continue
                    hits = [p for p in ignore if match_name(out_name, p)]
                    if hits:
                        used_patterns.update(hits)
                        result.ignored.append(out_name)
                        writer.add(out_name + ".weight", tensor)
                        continue
                    q, scale = quantize_weight(tensor.to(device), fp8.weights.strategy, observer,
                                               (hessians or {}).get(out_name))
                    writer.add(out_name + ".weight", q)
                    writer.add(out_name + ".weight_scale", scale)
                    if fp8.static_input:
                        writer.add(out_name + ".input_scale", scale_from_amax(input_amax[out_name], tensor.dtype))
                    result.quantized.append(out_name)
                bar.update(sizes[name])
            result.tied_lm_head = tied_lm_head(hf_config, names)
            if result.tied_lm_head is not None:  # no tensor of its own, but a module that stays bf16
                used_patterns.update(p for p in ignore if match_name(result.tied_lm_head, p))
                result.ignored.append(result.tied_lm_head)
            result.shards = writer.finish()
        except BaseException:
            writer.abort()  # no half-written shards left behind
            raise
        finally:
            bar.close()
    result.unused_ignore_patterns = [p for p in ignore if p not in used_patterns]

    hf_config["quantization_config"] = build_quantization_config(fp8, result.ignored)
    with open(os.path.join(output_path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
        f.write("\n")
    _copy_side_files(model_path, output_path)
    return result


def _check_input_amax(input_amax: dict[str, float], modules: list[str]) -> None:
    """Every quantized module needs a finite positive amax, checked before anything is written."""
    missing = [m for m in modules if m not in input_amax]
    if missing:
        raise ValueError(f"no calibrated activation amax for {len(missing)} modules, e.g. {missing[:3]}")
    bad = [m for m in modules if not 0 < float(input_amax[m]) < float("inf")]
    if bad:
        raise ValueError(f"activation amax must be finite and > 0; got {input_amax[bad[0]]} for {bad[0]!r} "
                         f"({len(bad)} modules); calibrate with more data")


def _nbytes(folder: SafetensorsFolder, name: str) -> int:
    sl = folder.get_slice(name)
    n = 1
    for d in sl.get_shape():
        n *= d
    return n * _DTYPE_BYTES.get(sl.get_dtype(), 2)


def expand_ignore(model_path: str, ignore: Iterable[str] = DEFAULT_IGNORE) -> list[str]:
    """The explicit module names (as saved in config.json) that `ignore` selects in a checkpoint."""
    ignore = list(ignore)
    with SafetensorsFolder(model_path) as folder:
        return [m for m in linear_modules(folder) if is_ignored(m, ignore)]
