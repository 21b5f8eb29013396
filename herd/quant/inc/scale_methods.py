"""INC scale methods: the named presets and the dict form of `scale_method` (INC >= 3.5).

A method is a pair of rules, one for weights and one for activations. A rule is
(granularity, value type, rounding, backoff, params). The dict form may override rules per node
name, per layer index or per module class, but every (weight, activation) pair must match one of the
presets on (granularity, value type, rounding); only backoff and params are free.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType


class Granularity(Enum):
    PTS = "PTS"   # per tensor
    PCS = "PCS"   # per channel (weights: out channel; dynamic activations: per token)


class ValueType(Enum):
    MAXABS = "MAXABS"
    FIXED_VALUE = "FIXED_VALUE"
    OPT = "OPT"
    DUMMY_SCALES = "DUMMY_SCALES"


class Rounding(Enum):
    IDENTITY = "IDENTITY"
    POW2 = "POW2"
    HW_ALIGNED = "HW_ALIGNED"
    HW_ALIGNED_FIXED = "HW_ALIGNED_FIXED"
    SCALE_UNIT = "SCALE_UNIT"


class ScaleMethod(Enum):
    """Named methods; `.name` is what goes into scale-cache file names (e.g. MAXABS_HW)."""
    UNIT_SCALE = "unit_scale"
    HW_ALIGNED_SINGLE_SCALE = "hw_aligned_single_scale"
    MAXABS_HW = "maxabs_hw"
    MAXABS_POW2 = "maxabs_pow2"
    MAXABS_ARBITRARY = "maxabs_arbitrary"
    MAXABS_HW_OPT_WEIGHT = "maxabs_hw_opt_weight"
    MAXABS_POW2_OPT_WEIGHT = "maxabs_pow2_opt_weight"
    ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2 = "act_maxabs_hw_weights_pcs_maxabs_pow2"
    ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2 = "act_maxabs_hw_weights_pcs_opt_pow2"
    ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2 = "act_maxabs_pow2_weights_pcs_maxabs_pow2"
    ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2 = "act_maxabs_pow2_weights_pcs_opt_pow2"
    ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW = "act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw"
    MAXABS_PCS_POW2 = "maxabs_pcs_pow2"

    @classmethod
    def parse(cls, value: str) -> "ScaleMethod":
        key = str(value).strip().upper()
        if key not in cls.__members__:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown scale_method {value!r}; choose one of: {names}")
        return cls[key]


@dataclass(frozen=True)
class TensorRule:
    granularity: Granularity = Granularity.PTS
    value_type: ValueType = ValueType.MAXABS
    rounding: Rounding = Rounding.IDENTITY
    backoff: float = 1.0
    # OPT candidates: "weight_scales" (absolute scales or per-channel multipliers); None for
    # maxabs_hw_opt_weight means "the HW scale set of the target device".
    params: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> tuple:
        return (self.granularity, self.value_type, self.rounding)


@dataclass(frozen=True)
class MethodSpec:
    weight: TensorRule
    activation: TensorRule

    @property
    def dynamic(self) -> bool:
        """Per-token activation scales computed at run time (no measurement needed)."""
        return self.activation.granularity is Granularity.PCS


def _rule(gran="PTS", vt="MAXABS", rnd="IDENTITY", backoff=1.0, scales=None) -> TensorRule:
    params = MappingProxyType({"weight_scales": tuple(scales)} if scales is not None else {})
    return TensorRule(Granularity[gran], ValueType[vt], Rounding[rnd], backoff, params)


_PCS_MULT = [2.0 ** s for s in range(-3, 5)]
_POW2_OPT = [2.0 ** s for s in range(-10, 10)]
_HW_OPT = MappingProxyType({"weight_scales": None})

PRESETS: MappingProxyType = MappingProxyType({
    ScaleMethod.UNIT_SCALE: MethodSpec(_rule(vt="FIXED_VALUE", rnd="SCALE_UNIT"),
                                       _rule(vt="FIXED_VALUE", rnd="SCALE_UNIT")),
    ScaleMethod.HW_ALIGNED_SINGLE_SCALE: MethodSpec(_rule(vt="FIXED_VALUE", rnd="HW_ALIGNED_FIXED"),
                                                    _rule(vt="FIXED_VALUE", rnd="HW_ALIGNED_FIXED")),
    ScaleMethod.MAXABS_HW: MethodSpec(_rule(rnd="HW_ALIGNED", backoff=0.5),
                                      _rule(rnd="HW_ALIGNED", backoff=0.25)),
    ScaleMethod.MAXABS_POW2: MethodSpec(_rule(rnd="POW2", backoff=0.5), _rule(rnd="POW2", backoff=0.25)),
    ScaleMethod.MAXABS_ARBITRARY: MethodSpec(_rule(backoff=0.5), _rule(backoff=0.25)),
    ScaleMethod.MAXABS_HW_OPT_WEIGHT: MethodSpec(
        replace(_rule(vt="OPT", rnd="HW_ALIGNED", backoff=0.5), params=_HW_OPT),
        _rule(rnd="HW_ALIGNED", backoff=0.25)),
    ScaleMethod.MAXABS_POW2_OPT_WEIGHT: MethodSpec(_rule(vt="OPT", rnd="POW2", backoff=0.5, scales=_POW2_OPT),
                                                   _rule(rnd="POW2", backoff=0.25)),
    ScaleMethod.ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2: MethodSpec(_rule("PCS", rnd="POW2", backoff=0.5),
                                                                  _rule(rnd="HW_ALIGNED", backoff=0.25)),
    ScaleMethod.ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2: MethodSpec(
        _rule("PCS", "OPT", "POW2", 0.5, _PCS_MULT), _rule(rnd="HW_ALIGNED", backoff=0.25)),
    ScaleMethod.ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2: MethodSpec(_rule("PCS", rnd="POW2", backoff=0.5),
                                                                    _rule(rnd="POW2", backoff=0.25)),
    ScaleMethod.ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2: MethodSpec(
        _rule("PCS", "OPT", "POW2", 0.5, _PCS_MULT), _rule(rnd="POW2", backoff=0.25)),
    # Dynamic methods: the activation backoff is version dependent (see dynamic_backoff()).
    ScaleMethod.ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW: MethodSpec(
        _rule(rnd="HW_ALIGNED", backoff=0.5), _rule("PCS", rnd="POW2")),
    ScaleMethod.MAXABS_PCS_POW2: MethodSpec(_rule("PCS", rnd="POW2", backoff=0.5), _rule("PCS", rnd="POW2")),
})


def preset_for(spec: MethodSpec) -> ScaleMethod | None:
    """The named method a (weight, activation) pair matches on granularity, value type, rounding."""
    for name, preset in PRESETS.items():
        if preset.weight.key == spec.weight.key and preset.activation.key == spec.activation.key:
            return name
    return None


def dynamic_backoff(inc_version: tuple[int, ...]) -> float:
    """Per-token activation backoff of the dynamic methods: 1.0 up to INC 3.8, 0.5 from 3.8.1."""
    return 0.5 if inc_version >= (3, 8, 1) else 1.0


# ---------------------------------------------------------------------------------------------
# Dict form
_RULE_KEYS = {"granularity", "scale_value_type", "rounding_method", "backoff", "params"}
_SECTIONS = ("nodes", "layers", "layer_types")
_LAYER_PATTERNS = (re.compile(r"layers\.(\d+)"), re.compile(r"layers/(\d+)"))


def _enum(enum_cls, value, where: str):
    if isinstance(value, enum_cls):
        return value
    key = str(value).strip().upper()
    if key not in enum_cls.__members__:
        raise ValueError(f"{where}: invalid {enum_cls.__name__} {value!r}; choose one of "
                         f"{', '.join(enum_cls.__members__)}")
    return enum_cls[key]


def _parse_rule(raw, base: TensorRule | None, where: str) -> TensorRule:
    """Missing fields come from `base` (the default entry) or, for the default itself, INC's
    built-in defaults: PTS, MAXABS, IDENTITY, backoff 1.0."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
    base = base or TensorRule()
    backoff = raw.get("backoff", base.backoff)
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or backoff <= 0:
        raise ValueError(f"{where}: backoff must be a positive number, got {backoff!r}")
    params = raw.get("params", None)
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"{where}: params must be an object")
    return TensorRule(
        granularity=_enum(Granularity, raw.get("granularity", base.granularity), where),
        value_type=_enum(ValueType, raw.get("scale_value_type", base.value_type), where),
        rounding=_enum(Rounding, raw.get("rounding_method", base.rounding), where),
        backoff=float(backoff),
        params=MappingProxyType(dict(params)) if params is not None else base.params)


def _parse_entry(raw, default: MethodSpec | None, where: str) -> MethodSpec:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object with 'weight' and/or 'activation'")
    unknown = set(raw) - {"weight", "activation"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected 'weight' and 'activation'")
    spec = MethodSpec(
        weight=_parse_rule(raw.get("weight"), default.weight if default else None, f"{where}.weight"),
        activation=_parse_rule(raw.get("activation"), default.activation if default else None,
                               f"{where}.activation"))
    preset = preset_for(spec)
    if preset is None:
        raise ValueError(
            f"{where}: (weight={_describe(spec.weight)}, activation={_describe(spec.activation)}) "
            "matches no predefined scale method; only backoff and params may differ from a preset")
    ref = PRESETS[preset]
    # Fill missing params (e.g. the OPT candidate list) from the matching preset.
    return MethodSpec(weight=replace(spec.weight, params=_merge(spec.weight.params, ref.weight.params)),
                      activation=replace(spec.activation,
                                         params=_merge(spec.activation.params, ref.activation.params)))


def _merge(own, ref) -> MappingProxyType:
    merged = dict(ref)
    merged.update({k: v for k, v in own.items() if v is not None})
    return MappingProxyType(merged)


def _describe(rule: TensorRule) -> str:
    return f"{rule.granularity.name}/{rule.value_type.name}/{rule.rounding.name}"


@dataclass(frozen=True)
class ScaleMethodTable:
    """A resolved `scale_method`: a default spec plus per-node / per-layer / per-class overrides."""
    default: MethodSpec
    name: ScaleMethod                     # the preset the default matches (used in file names)
    nodes: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    layers: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    layer_types: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    from_dict: bool = False

    @classmethod
    def from_name(cls, method: "str | ScaleMethod") -> "ScaleMethodTable":
        method = method if isinstance(method, ScaleMethod) else ScaleMethod.parse(method)
        return cls(default=PRESETS[method], name=method)

    @classmethod
    def parse(cls, raw) -> "ScaleMethodTable":
        if isinstance(raw, (str, ScaleMethod)):
            return cls.from_name(raw)
        if not isinstance(raw, dict):
            raise ValueError("scale_method must be a method name or an object with a 'default' entry")
        unknown = set(raw) - {"default", *_SECTIONS}
        if unknown:
            raise ValueError(f"scale_method: unknown key(s) {sorted(unknown)}; "
                             "allowed: default, nodes, layers, layer_types")
        if "default" not in raw:
            raise ValueError("scale_method: the dict form needs a 'default' entry")
        default = _parse_entry(raw["default"], None, "scale_method.default")
        sections = {}
        for sec in _SECTIONS:
            entries = raw.get(sec, {}) or {}
            if not isinstance(entries, dict):
                raise ValueError(f"scale_method.{sec} must be an object")
            if sec == "layers":
                bad = [k for k in entries if not str(k).isdigit()]
                if bad:
                    raise ValueError(f"scale_method.layers keys must be layer indices, got {bad}")
            sections[sec] = MappingProxyType({str(k): _parse_entry(v, default, f"scale_method.{sec}[{k!r}]")
                                              for k, v in entries.items()})
        specs = [default, *(s for sec in sections.values() for s in sec.values())]
        if len({s.dynamic for s in specs}) > 1:
            raise ValueError("scale_method: static and dynamic (per-token) methods cannot be mixed")
        return cls(default=default, name=preset_for(default), from_dict=True, **sections)

    @property
    def dynamic(self) -> bool:
        return self.default.dynamic

    def lookup(self, node_name: str, class_name: str | None = None) -> MethodSpec:
        """INC's order: exact node name, then layer index, then module class, then default."""
        if node_name in self.nodes:
            return self.nodes[node_name]
        for pat in _LAYER_PATTERNS:
            m = pat.search(node_name)
            if m:
                if m.group(1) in self.layers:
                    return self.layers[m.group(1)]
                break
        if class_name is not None and class_name in self.layer_types:
            return self.layer_types[class_name]
        return self.default

    def all_specs(self) -> list[MethodSpec]:
        return [self.default, *self.nodes.values(), *self.layers.values(), *self.layer_types.values()]
