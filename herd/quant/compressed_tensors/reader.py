"""Reading HF safetensors folders and compressed-tensors FP8 checkpoints, tensor by tensor.

Nothing here loads a whole checkpoint: tensors are read one at a time through safetensors' mmap,
so the same code serves a 3 MB test model and a 200 GB Maverick.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from safetensors import safe_open

from herd.quant.compressed_tensors.config import CompressedTensorsFP8Config, read_compressed_config
from herd.quant.observers import dequantize_fp8

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIXES = (".weight_scale", ".input_scale")


class SafetensorsFolder:
    """A checkpoint folder: one `*.safetensors` file or shards listed in model.safetensors.index.json."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
        self.path = path
        self._handles: dict[str, object] = {}
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
            missing = sorted({fn for fn in self.weight_map.values() if not os.path.isfile(os.path.join(path, fn))})
            if missing:
                raise FileNotFoundError(f"{INDEX_FILE} in {path} lists missing shards: {missing}")
            self.files = sorted(set(self.weight_map.values()))
        else:
            self.files = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
            if not self.files:
                raise FileNotFoundError(f"no .safetensors files (and no {INDEX_FILE}) in {path}")
            self.weight_map = {}
            for fn in self.files:
                for name in self._handle(fn).keys():
                    self.weight_map[name] = fn

    def _handle(self, filename: str):
        if filename not in self._handles:
            self._handles[filename] = safe_open(os.path.join(self.path, filename), framework="pt")
        return self._handles[filename]

    def names(self, filename: str | None = None) -> list[str]:
        """Tensor names, all of them or those of one shard, in a stable order."""
        if filename is None:
            return [n for fn in self.files for n in self.names(fn)]
        return sorted(self._handle(filename).keys())

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.path}")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def get_slice(self, name: str):
        """Lazy view: `folder.get_slice(n)[e]` reads only expert e of a fused tensor."""
        return self._handle(self.weight_map[name]).get_slice(name)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every (name, tensor), shard by shard; a shard's handle is dropped once it is read."""
        for fn in self.files:
            for name in self.names(fn):
                yield name, self._handle(fn).get_tensor(name)
            self._handles.pop(fn, None)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class FP8LinearTensors:
    """One quantized Linear of a compressed-tensors checkpoint (HF module name)."""

    name: str
    weight: torch.Tensor  # float8_e4m3fn [out, in]
    weight_scale: torch.Tensor  # [out, 1] or [1], model dtype
    input_scale: torch.Tensor | None = None  # [1], static schemes only

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype)


class CompressedCheckpoint(SafetensorsFolder):
    """A compressed-tensors FP8 checkpoint. `config` is None for a plain (unquantized) folder."""

    def __init__(self, path: str):
        super().__init__(path)
        self.config: CompressedTensorsFP8Config | None = read_compressed_config(path)

    def quantized_modules(self) -> list[str]:
        """HF module names that carry an FP8 weight (they have a `weight_scale`)."""
        return [n[: -len(".weight_scale")] for n in self.names() if n.endswith(".weight_scale")]

    def module(self, name: str) -> FP8LinearTensors:
        weight = self.get(name + ".weight")
        if weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{name}.weight is {weight.dtype}, expected float8_e4m3fn")
        input_scale = self.get(name + ".input_scale") if name + ".input_scale" in self else None
        return FP8LinearTensors(name, weight, self.get(name + ".weight_scale"), input_scale)

    def iter_modules(self) -> Iterator[FP8LinearTensors]:
        for name in self.quantized_modules():
            yield self.module(name)

    def iter_dequantized(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor with FP8 weights replaced by dequant(weight) (in `dtype`, default the scale's
        dtype) and the scale tensors dropped: a plain per-expert HF state dict, streamed."""
        quantized = set(self.quantized_modules())
        for name, t in self.iter_tensors():
            if name.endswith(SCALE_SUFFIXES) and name.rsplit(".", 1)[0] in quantized:
                continue
            if name.endswith(".weight") and name[: -len(".weight")] in quantized:
                yield name, dequantize_fp8(t, self.get(name[: -len(".weight")] + ".weight_scale"), dtype)
            else:
                yield name, t


def load_compressed_checkpoint_tensors(
    path: str, dequantize: bool = False, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of a compressed-tensors checkpoint, per-expert naming
    (`...experts.{e}.gate_proj.weight`, `.weight_scale`, `.input_scale`), streamed shard by shard.
    With `dequantize=True` FP8 weights come back dequantized and the scales are left out."""
    with CompressedCheckpoint(path) as ckpt:
        if ckpt.config is None:
            raise ValueError(f"{path} is not a compressed-tensors checkpoint (no quantization_config)")
        yield from (ckpt.iter_dequantized(dtype) if dequantize else ckpt.iter_tensors())
