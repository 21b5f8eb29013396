"""Measurement files (spec A5) and the maxabs observer that fills them.

On disk, for `dump_stats_path = P`:
  P_hooks_maxabs_<rank>_<world>.json      json.dump(indent=4), every value nested as [[v]]
  P_hooks_maxabs_<rank>_<world>.npz       np.savez of the same dict (a pickled object under arr_0);
                                          this is the file INC reads back
  P_hooks_maxabs_<rank>_<world>_mod_list.json   the measured node names
The `_<rank>_<world>` suffix is written for a single rank too (`_0_1`, as INC under vLLM-HPU's
torch.distributed writes it); only `seperate_measure_files: false` leaves it out.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from herd.quant.inc.config import IncQuantConfig
from herd.quant.inc.nodes import (NODE_TYPES, PATCHED_ONLY_CLASSES, IncNode, NodeNaming, inc_nodes_for_module,
                                  is_selected, measurement_stem, node_weight, rank_stems)


@dataclass
class NodeStats:
    """Per-tensor maxabs of one node: one value per input / output, and the weight's."""
    inputs: list[float]
    outputs: list[float] | None = None
    weight: float | None = None


@dataclass
class Measurements:
    nodes: dict[str, NodeStats] = field(default_factory=dict)
    local_rank: int | None = -1
    global_rank: int | None = None
    num_samples: int | None = None
    mode: str = "DynamicRange"

    # ---- serialization ----------------------------------------------------------------------
    def to_dict(self, as_numpy: bool = False) -> dict:
        def leaf(v: float):
            return np.array([[v]], dtype=np.float32) if as_numpy else [[float(v)]]

        out: dict = {}
        if self.num_samples is not None:
            out["NumSamples"] = self.num_samples
        out.update({"GlobalRank": self.global_rank, "LocalRank": self.local_rank, "Mode": self.mode})
        nodes = {}
        for name, st in self.nodes.items():
            entry: dict = {"inputs": [leaf(v) for v in st.inputs]}
            if st.outputs is not None:
                entry["outputs"] = [leaf(v) for v in st.outputs]
            if st.weight is not None:
                entry["params"] = {"weight": leaf(st.weight)}
            nodes[name] = entry
        out["Nodes"] = nodes
        return out

    @classmethod
    def from_dict(cls, raw: dict, where: str = "measurements") -> "Measurements":
        if not isinstance(raw, dict) or "Nodes" not in raw:
            raise ValueError(f"{where}: not an INC measurement file (no 'Nodes')")
        if raw.get("Mode", "DynamicRange") != "DynamicRange":
            raise ValueError(f"{where}: Mode is {raw.get('Mode')!r}; expected 'DynamicRange' "
                             "(is this a scale-cache file?)")
        nodes = {}
        for name, entry in raw["Nodes"].items():
            params = entry.get("params") or {}
            nodes[name] = NodeStats(
                inputs=[_scalar(v) for v in _items(entry.get("inputs", []))],
                outputs=[_scalar(v) for v in _items(entry["outputs"])] if entry.get("outputs") is not None else None,
                weight=_scalar(params["weight"]) if params.get("weight") is not None else None)
        return cls(nodes, local_rank=raw.get("LocalRank"), global_rank=raw.get("GlobalRank"),
                   num_samples=raw.get("NumSamples"))

    def save(self, stem: str | Path, with_mod_list: bool = True, mod_list: list[str] | None = None) -> list[Path]:
        """Write <stem>.json, <stem>.npz and (optionally) <stem>_mod_list.json (`mod_list`, default:
        the node names)."""
        stem = str(stem)
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        paths = [Path(stem + ".json"), Path(stem + ".npz")]
        paths[0].write_text(json.dumps(self.to_dict(), indent=4))
        np.savez(paths[1], self.to_dict(as_numpy=True))
        if with_mod_list:
            paths.append(Path(stem + "_mod_list.json"))
            paths[2].write_text(json.dumps(list(self.nodes) if mod_list is None else mod_list, indent=4))
        return paths

    @classmethod
    def load(cls, path: str | Path) -> "Measurements":
        """Read a .npz (what INC reads) or .json file; a bare stem prefers the .npz."""
        return cls.from_dict(read_stats_file(path), where=str(path))


def read_stats_file(path: str | Path) -> dict:
    path = Path(path)
    if path.suffix not in (".npz", ".json"):
        candidates = [Path(f"{path}.npz"), Path(f"{path}.json")]
        path = next((p for p in candidates if p.exists()), candidates[0])
    if not path.exists():
        raise FileNotFoundError(f"measurement file not found: {path} (run the MEASURE pass first)")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=True) as data:
            return data["arr_0"].item()
    return json.loads(path.read_text())


def _items(value) -> list:
    """A list of per-tensor entries; the calibration scripts store a stacked array instead."""
    return list(value) if isinstance(value, (list, tuple)) else list(np.asarray(value))


def _scalar(value) -> float:
    """[[v]] (or a per-channel vector, reduced to its max, which is the tensor's maxabs) -> v."""
    arr = np.asarray(value, dtype=np.float64)
    return float(arr.max()) if arr.size else 0.0


def backup_existing(prefix: str | Path, now: float | None = None) -> Path | None:
    """INC's MEASURE start: move every file whose name starts with the prefix's basename into
    backup_<basename>_<dd-mm_HH:MM:SS>/ next to it, so a new run never mixes with an old one."""
    prefix = Path(prefix)
    folder = prefix.parent
    if not folder.is_dir():
        return None
    victims = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(prefix.name)]
    if not victims:
        return None
    stamp = time.strftime("%d-%m_%H:%M:%S", time.localtime(now))
    dest = folder / f"backup_{prefix.name}_{stamp}"
    dest.mkdir(exist_ok=True)
    for p in victims:
        shutil.move(str(p), dest / p.name)
    return dest


class MeasurementCollector:
    """maxabs observer over INC nodes.

    The running state of every observed tensor is max(state, max|x|) kept in `hp_dtype` (bf16 by
    default, so saved values are bf16-exact like INC's). States live on `device` so observing never
    synchronizes with the accelerator; values are read only when saving.
    """

    def __init__(self, config: IncQuantConfig, rank: int | None = None, world_size: int | None = None,
                 device: str | torch.device = "cpu"):
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.dtype = config.hp_torch_dtype
        self.nodes: dict[str, IncNode] = {}
        self.skipped: set[str] = set()
        self._mod_list: list[str] = []   # INC's selected modules: the nodes plus patched-only FusedMoE
        self._state: dict[str, dict[str, torch.Tensor | None]] = {}
        self.num_forwards = 0

    # ---- registration -----------------------------------------------------------------------
    def add_node(self, node: IncNode) -> bool:
        """Register a node; returns False when the allow/block lists leave it out."""
        if node.type not in NODE_TYPES:
            raise ValueError(f"{node.name}: unknown op type {node.type!r}")
        if not is_selected(node.name, node.class_name, self.config):
            self.skipped.add(node.name)
            return False
        kind = NODE_TYPES[node.type]
        record_out = kind.required_output or not self.config.outputs_excluded
        zeros = lambda n: torch.zeros(n, dtype=self.dtype, device=self.device)  # noqa: E731
        self.nodes[node.name] = node
        self._mod_list.append(node.name)
        self._state[node.name] = {"inputs": zeros(kind.num_inputs),
                                  "outputs": zeros(node.num_outputs) if record_out else None,
                                  "weight": zeros(1) if kind.has_weight else None}
        return True

    def add_module(self, name: str, class_name: str, num_local_experts: int | None = None,
                   prefix: "str | NodeNaming" = "") -> list[IncNode]:
        """Register the INC nodes of one herd module; returns the selected ones."""
        if class_name in PATCHED_ONLY_CLASSES:
            naming = prefix if isinstance(prefix, NodeNaming) else NodeNaming(prefix)
            if is_selected(naming.inc_name(name), class_name, self.config):
                self._mod_list.append(naming.inc_name(name))
        return [n for n in inc_nodes_for_module(name, class_name, num_local_experts, prefix) if self.add_node(n)]

    def add_model(self, model, prefix: "str | NodeNaming | None" = None) -> list[IncNode]:
        """Register every INC node of a herd model and record the weights' maxabs once (INC measures
        params.weight at patch time). `prefix`: a NodeNaming or a name prefix ("language_model."
        for multimodal checkpoints); None derives it from the model's config."""
        if prefix is None:
            prefix = NodeNaming.for_model(getattr(model, "config", None))
        selected = []
        for name, module in model.named_modules():
            nodes = self.add_module(name, type(module).__name__, getattr(module, "num_local_experts", None), prefix)
            for node in nodes:
                if self._state[node.name]["weight"] is not None:
                    w = node_weight(model, node)
                    if w is not None:
                        self.observe(node.name, "weight", 0, w.float() if w.element_size() == 1 else w)
            selected += nodes
        return selected

    @property
    def mod_list(self) -> list[str]:
        return list(self._mod_list)

    def wants(self, node_name: str, kind: str) -> bool:
        """Whether observe() would record anything (lets callers skip computing a tensor)."""
        state = self._state.get(node_name)
        return state is not None and state["weight" if kind == "weight" else kind] is not None

    # ---- observation ------------------------------------------------------------------------
    def observe(self, node_name: str, kind: str, index: int, tensor: torch.Tensor) -> None:
        """Fold max|tensor| into inputs[index] / outputs[index] / the weight ("weight", index ignored)."""
        slot = self._slot(node_name, kind, index)
        if slot is None or tensor.numel() == 0:
            return
        self._update(slot, index if kind != "weight" else 0, tensor.detach().abs().amax())

    def observe_amax(self, node_name: str, kind: str, index: int, amax: float | torch.Tensor) -> None:
        """Like observe() for an already reduced max|x| (e.g. computed inside a fused kernel)."""
        slot = self._slot(node_name, kind, index)
        if slot is not None:
            self._update(slot, index if kind != "weight" else 0, torch.as_tensor(amax))

    def observe_expert_amax(self, moe_node: str, amax_per_expert: torch.Tensor) -> None:
        """outputs[1 + e] of a dynamic_moe node: max|intermediate| (the w2 input) of each local
        expert. Experts that got no tokens this step must report 0."""
        slot = self._slot(moe_node, "outputs", 0)
        if slot is None:
            return
        amax = amax_per_expert.detach().to(device=self.device, dtype=torch.float32).reshape(-1)
        if amax.numel() != slot.numel() - 1:
            raise ValueError(f"{moe_node}: got {amax.numel()} expert amax values, "
                             f"node has {slot.numel() - 1} local experts")
        slot[1:] = torch.maximum(slot[1:], amax.to(self.dtype))

    def step(self) -> None:
        """Count one model forward; dumps files every `calibration_sample_interval` forwards."""
        self.num_forwards += 1
        every = self.config.calibration_sample_interval
        if every and self.num_forwards % every == 0:
            self.save()

    def _slot(self, node_name: str, kind: str, index: int) -> torch.Tensor | None:
        if kind not in ("inputs", "outputs", "weight"):
            raise ValueError(f"kind must be 'inputs', 'outputs' or 'weight', got {kind!r}")
        state = self._state.get(node_name)
        if state is None:
            if node_name in self.skipped:
                return None
            raise KeyError(f"node {node_name!r} was never registered with the collector")
        slot = state[kind]
        if slot is not None and kind != "weight" and not 0 <= index < slot.numel():
            raise IndexError(f"{node_name}: {kind}[{index}] out of range (node has {slot.numel()})")
        return slot

    def _update(self, slot: torch.Tensor, index: int, amax: torch.Tensor) -> None:
        amax = amax.to(device=slot.device, dtype=torch.float32).to(self.dtype)
        slot[index] = torch.maximum(slot[index], amax)

    # ---- output -----------------------------------------------------------------------------
    def measurements(self) -> Measurements:
        nodes = {}
        for name, st in self._state.items():
            vals = {k: (v.float().cpu().tolist() if v is not None else None) for k, v in st.items()}
            nodes[name] = NodeStats(inputs=vals["inputs"], outputs=vals["outputs"],
                                    weight=vals["weight"][0] if vals["weight"] is not None else None)
        every = self.config.calibration_sample_interval
        # the rank in the file name: 0 for a single rank (`_0_1`), none for one shared file
        local = (self.rank or 0) if self.config.seperate_measure_files else None
        return Measurements(nodes, local_rank=local,
                            num_samples=self.num_forwards if every else None)

    @property
    def stem(self) -> str:
        make = lambda r, w: measurement_stem(self.config.dump_stats_path, self.config.observer, r, w)  # noqa: E731
        return rank_stems(make, self.rank, self.world_size, self.config.seperate_measure_files)[0]

    def prepare_output_dir(self) -> Path | None:
        """Back up earlier files under the prefix (rank 0 only, so ranks don't race)."""
        if self.rank not in (None, 0):
            return None
        return backup_existing(self.config.dump_stats_path)

    def save(self) -> list[Path]:
        return self.measurements().save(self.stem, mod_list=self.mod_list)
