"""The embedded default checkpoint: a 5.6M-parameter Llama 4 shipped inside the package."""
from __future__ import annotations


def default_model_path() -> str:
    from importlib.resources import files
    return str(files("herd") / "assets" / "default")
