"""Arguments that are JSON objects: a dict, or JSON text of one (what a CLI flag carries).

A leaf module: herd.config and the per-feature configs it builds (herd.structured_output) both
parse such arguments, and neither may import the other at module level.
"""
from __future__ import annotations

import json


def parse_json_object(value, name: str) -> dict:
    """A dict, or JSON text of an object (CLI flags); None -> {}."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON ({e}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    return dict(value)
