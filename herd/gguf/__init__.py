"""GGUF (llama.cpp) files: converted once into a Hugging Face checkpoint folder that herd loads."""
from __future__ import annotations

__all__ = ["convert_gguf", "gguf_cache_dir", "gguf_to_hf", "is_gguf_path"]


def __getattr__(name: str):
    # imported on first use, so that `python -m herd.gguf.convert` runs the module only once
    # (importing it here first makes runpy warn and execute a second copy)
    if name in __all__:
        from herd.gguf import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'herd.gguf' has no attribute {name!r}")
