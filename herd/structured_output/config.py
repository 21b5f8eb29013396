"""StructuredOutputsConfig: the engine-wide structured outputs settings (vLLM's
--structured-outputs-config and its older --guided-decoding-backend)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from herd.json_args import parse_json_object

# Backends herd has, and names vLLM users may pass that mean the same here.
BACKENDS = ("guidance",)
BACKEND_ALIASES = {"auto": "guidance", "guidance": "guidance", "llguidance": "guidance"}
# vLLM backends that herd does not ship: a clear error instead of "unknown".
OTHER_VLLM_BACKENDS = ("xgrammar", "outlines", "lm-format-enforcer")


def resolve_backend(name: str | None) -> str:
    """A backend name as vLLM accepts it -> the herd backend; ValueError for others."""
    key = (name or "auto").strip().lower()
    if key in BACKEND_ALIASES:
        return BACKEND_ALIASES[key]
    if key in OTHER_VLLM_BACKENDS:
        raise ValueError(f"structured outputs backend {name!r} is not available in herd; use 'guidance' "
                         "(llguidance) or 'auto'")
    raise ValueError(f"unknown structured outputs backend {name!r}; choose auto or guidance")


@dataclass
class StructuredOutputsConfig:
    backend: str = "auto"
    disable_fallback: bool = False               # accepted for vLLM compatibility: one backend only
    # Default for requests that do not say. Compact JSON unless asked: free whitespace lets a model
    # that favours it (small ones do) spend every token on newlines and never close the object.
    disable_any_whitespace: bool = True
    # Objects that list properties but say nothing of additionalProperties allow no others (as
    # xgrammar's strict mode, vLLM's default backend): otherwise a reply may go on with invented keys.
    disable_additional_properties: bool = True

    def __post_init__(self):
        self.backend = resolve_backend(self.backend)

    @classmethod
    def parse(cls, value) -> "StructuredOutputsConfig":
        """None, a StructuredOutputsConfig, a dict, JSON text or a bare backend name."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and not value.strip().startswith("{"):
            return cls(backend=value.strip())
        value = parse_json_object(value, "structured outputs config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown structured outputs config keys {unknown}; known: {sorted(known)}")
        return cls(**value)
