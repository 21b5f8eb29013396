"""QUANT_CONFIG: INC's FP8 JSON config, parsed the way INC's `Fp8cfg.parse` reads it.

Keys are case-sensitive; enum values are case-insensitive; `whitelist`/`blacklist` are the legacy
names of `allowlist`/`blocklist`; unknown keys are accepted and kept in `extra` (INC stores and
ignores them too, e.g. "method": "HOOKS").

herd adds one optional key of its own, `inc_version` (default "3.8.1"), choosing which INC release's
backoff rules to follow (INC ignores unknown keys, so the file stays valid for INC):
* < 3.5: `scale_params.input_backoff/weight_backoff/output_backoff` override the preset backoffs;
* >= 3.5: they are ignored (with a warning); the dict form of `scale_method` sets backoff instead;
* dynamic per-token activation backoff is 1.0 before 3.8.1 and 0.5 from 3.8.1.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from herd.quant.formats import Fp8Format, ScaleDevice, fp8_format
from herd.quant.inc.scale_methods import (MethodSpec, ScaleMethodTable, TensorRule, dynamic_backoff)

DEFAULT_INC_VERSION = "3.8.1"

_MODES = ("MEASURE", "QUANTIZE", "LOAD", "SHAPE", "NONE")
_OBSERVERS = ("maxabs", "maxabs_per_channel", "save", "shape")
_MEASURE_EXCLUDE = ("NONE", "INPUT", "OUTPUT", "PARAMS", "ALL")
_SCALE_FORMATS = ("CONST", "SCALAR")
_FP8 = ("E4M3", "E5M2")
_HP_DTYPES = {"BF16": torch.bfloat16, "FP16": torch.float16, "FP32": torch.float32}
_BOOL_KEYS = ("dynamic_quantization", "ignore_modules_wo_measures", "recalc_scales", "use_qdq",
              "fake_quant", "measure_on_hpu", "row_parallel_linear_allreduce_quantization",
              "seperate_measure_files")
_KNOWN = {"mode", "observer", "allowlist", "blocklist", "whitelist", "blacklist", "dump_stats_path",
          "scale_method", "scale_params", "measure_exclude", "scale_format", "device_for_scales",
          "fp8_config", "hp_dtype", "calibration_sample_interval", "mod_dict", "inc_version",
          *_BOOL_KEYS}


class QuantConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModuleFilter:
    """allowlist / blocklist: module class names and regexes searched in module names."""
    types: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.types and not self.names

    def matches_name(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.names)


@dataclass
class IncQuantConfig:
    mode: str = "QUANTIZE"
    observer: str = "maxabs"
    allowlist: ModuleFilter = field(default_factory=ModuleFilter)
    blocklist: ModuleFilter = field(default_factory=ModuleFilter)
    dump_stats_path: str = "stats"
    scale_method: ScaleMethodTable = field(default_factory=lambda: ScaleMethodTable.from_name("maxabs_hw"))
    scale_params: dict = field(default_factory=dict)
    measure_exclude: str = "OUTPUT"
    scale_format: str = "SCALAR"
    device_for_scales: ScaleDevice | None = None    # None: the device herd runs on
    dynamic_quantization: bool = False
    fp8_config: str = "E4M3"
    hp_dtype: str = "BF16"
    ignore_modules_wo_measures: bool = False
    recalc_scales: bool = False
    use_qdq: bool = False
    fake_quant: bool = False
    measure_on_hpu: bool = True
    row_parallel_linear_allreduce_quantization: bool = False
    calibration_sample_interval: int = 0
    seperate_measure_files: bool = True   # (sic) INC's spelling
    inc_version: tuple[int, ...] = field(default_factory=lambda: _version(DEFAULT_INC_VERSION))
    extra: dict = field(default_factory=dict)
    source: str | None = None

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_json_file(cls, path: str | Path) -> "IncQuantConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise QuantConfigError(f"QUANT_CONFIG file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise QuantConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str | None = None) -> "IncQuantConfig":
        where = source or "QUANT_CONFIG"
        if not isinstance(raw, dict):
            raise QuantConfigError(f"{where}: the top level must be a JSON object")
        try:
            return cls._parse(dict(raw), source)
        except QuantConfigError:
            raise
        except ValueError as e:
            raise QuantConfigError(f"{where}: {e}") from None

    @classmethod
    def _parse(cls, raw: dict, source: str | None) -> "IncQuantConfig":
        kw: dict = {"source": source, "extra": {k: v for k, v in raw.items() if k not in _KNOWN}}
        if "mode" in raw:
            kw["mode"] = _choice(raw["mode"], _MODES, "mode")
        if "observer" in raw:
            obs = _choice(raw["observer"], tuple(o.upper() for o in _OBSERVERS), "observer").lower()
            if obs != "maxabs":
                raise ValueError(f"observer {obs!r} is valid for INC but herd implements only 'maxabs'")
            kw["observer"] = obs
        kw["allowlist"] = _module_filter(raw, "allowlist", "whitelist")
        kw["blocklist"] = _module_filter(raw, "blocklist", "blacklist")
        if "dump_stats_path" in raw:
            if not isinstance(raw["dump_stats_path"], str):
                raise ValueError("dump_stats_path must be a string (directory plus file prefix)")
            kw["dump_stats_path"] = raw["dump_stats_path"]
        if "scale_method" in raw:
            kw["scale_method"] = ScaleMethodTable.parse(raw["scale_method"])
        if "scale_params" in raw:
            kw["scale_params"] = _scale_params(raw["scale_params"])
        for key, choices in (("measure_exclude", _MEASURE_EXCLUDE), ("scale_format", _SCALE_FORMATS),
                             ("fp8_config", _FP8), ("hp_dtype", tuple(_HP_DTYPES))):
            if key in raw:
                kw[key] = _choice(raw[key], choices, key)
        if raw.get("device_for_scales") is not None:
            kw["device_for_scales"] = ScaleDevice.parse(raw["device_for_scales"])
        for key in _BOOL_KEYS:
            if key in raw:
                kw[key] = _bool(raw[key], key)
        if "calibration_sample_interval" in raw:
            v = raw["calibration_sample_interval"]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"calibration_sample_interval must be an integer >= 0, got {v!r}")
            kw["calibration_sample_interval"] = v
        if raw.get("mod_dict"):
            raise ValueError("mod_dict must be empty: custom module types are not supported")
        if "inc_version" in raw:
            kw["inc_version"] = _version(raw["inc_version"])
        cfg = cls(**kw)
        cfg._validate()
        return cfg

    def _validate(self):
        if self.dynamic_quantization:
            if not self.scale_method.dynamic:
                raise ValueError(f"dynamic_quantization needs a dynamic scale_method "
                                 "(act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw or maxabs_pcs_pow2), "
                                 f"got {self.scale_method.name.value}")
            if self.mode not in ("QUANTIZE", "LOAD"):
                raise ValueError(f"dynamic_quantization works only in QUANTIZE/LOAD mode, not {self.mode}")
            if self.use_qdq or self.fake_quant:
                raise ValueError("dynamic_quantization cannot be combined with use_qdq or fake_quant")
        elif self.scale_method.dynamic:
            raise ValueError(f"scale_method {self.scale_method.name.value} computes per-token scales at "
                             "run time and needs \"dynamic_quantization\": true")
        if self.scale_params and self.inc_version >= (3, 5) and any(
                k in self.scale_params for k in ("input_backoff", "weight_backoff", "output_backoff")):
            warnings.warn(f"{self.source or 'QUANT_CONFIG'}: scale_params backoffs are ignored, as INC >= 3.5 "
                          "does; set backoff in the dict form of scale_method, or \"inc_version\": \"3.4\" "
                          "to apply them", stacklevel=3)

    # ---- derived values ---------------------------------------------------------------------
    @property
    def hp_torch_dtype(self) -> torch.dtype:
        return _HP_DTYPES[self.hp_dtype]

    @property
    def effective_scale_format(self) -> str:
        """INC forces CONST for per-channel weight methods, fake quant and dynamic quantization."""
        pcs = any(s.weight.granularity.name == "PCS" for s in self.scale_method.all_specs())
        return "CONST" if (pcs or self.fake_quant or self.dynamic_quantization) else self.scale_format

    def scale_device(self, current: "str | ScaleDevice" = ScaleDevice.CUDA) -> ScaleDevice:
        return self.device_for_scales or ScaleDevice.parse(current)

    def format_for(self, device: "str | ScaleDevice") -> Fp8Format:
        return fp8_format(device, self.fp8_config)

    @property
    def outputs_excluded(self) -> bool:
        """measure_exclude OUTPUT/ALL: skip outputs of ops that don't require them (INC acts on no other value)."""
        return self.measure_exclude in ("OUTPUT", "ALL")

    @property
    def method_name(self) -> str:
        """Enum name used in scale-cache file names, e.g. MAXABS_HW."""
        return self.scale_method.name.name

    @property
    def needs_measurements(self) -> bool:
        return not (self.dynamic_quantization or self.scale_method.default.value_type.name == "FIXED_VALUE")

    def rules_for(self, node_name: str, class_name: str | None = None) -> tuple[TensorRule, TensorRule, TensorRule]:
        """(weight, input, output) rules for a node, with version-dependent backoff applied."""
        spec: MethodSpec = self.scale_method.lookup(node_name, class_name)
        weight, act = spec.weight, spec.activation
        if spec.dynamic:
            act = replace(act, backoff=dynamic_backoff(self.inc_version))
        # INC <= 3.4 merges scale_params into the preset's defaults; later versions ignore them.
        p = self.scale_params if self.inc_version < (3, 5) and not self.scale_method.from_dict else {}
        weight = replace(weight, backoff=float(p.get("weight_backoff", weight.backoff)))
        act = replace(act, backoff=float(p.get("input_backoff", act.backoff)))
        out = replace(act, backoff=float(p.get("output_backoff", act.backoff)))
        return weight, act, out


# ---- field parsers ------------------------------------------------------------------------------
def _choice(value, choices: tuple[str, ...], key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    v = value.strip().upper()
    if v not in choices:
        raise ValueError(f"invalid {key} {value!r}; choose one of {', '.join(choices)}")
    return v


def _bool(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{key} must be true or false, got {value!r}")


def _module_filter(raw: dict, key: str, legacy: str) -> ModuleFilter:
    if key in raw and legacy in raw:
        raise ValueError(f"give either {key!r} or its legacy name {legacy!r}, not both")
    value = raw.get(key, raw.get(legacy))
    name = key if key in raw else legacy
    if value is None:
        return ModuleFilter()
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object like {{\"types\": [...], \"names\": [...]}}")
    unknown = set(value) - {"types", "names"}
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {sorted(unknown)}; expected 'types' and/or 'names'")
    out = {}
    for sub in ("types", "names"):
        items = value.get(sub) or []
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{name}.{sub} must be a list of strings")
        out[sub] = tuple(items)
    for pattern in out["names"]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{name}.names: bad regular expression {pattern!r} ({e})") from None
    return ModuleFilter(**out)


def _scale_params(value) -> dict:
    if not isinstance(value, dict):
        raise ValueError("scale_params must be an object")
    for k in ("input_backoff", "weight_backoff", "output_backoff"):
        if k in value:
            v = value[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"scale_params.{k} must be a positive number, got {v!r}")
    return dict(value)


def _version(value) -> tuple[int, ...]:
    parts = str(value).strip().split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"inc_version must look like \"3.8.1\", got {value!r}")
    return tuple(int(p) for p in parts)
