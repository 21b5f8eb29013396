"""Chooses the attention backend once, at start-up, from the engine config."""
from __future__ import annotations

from herd.attention.backends.abstract import AttentionBackend

BACKENDS = ("reference", "sdpa", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_attn_backend(name: str | None, device_type: str) -> AttentionBackend:
    """name None / "auto": triton on CUDA when it imports, else sdpa."""
    if name in (None, "auto"):
        name = "triton" if device_type == "cuda" and triton_available() else "sdpa"
    if name == "reference":
        from herd.attention.backends.reference import ReferenceAttentionBackend
        return ReferenceAttentionBackend()
    if name == "sdpa":
        from herd.attention.backends.sdpa import SdpaAttentionBackend
        return SdpaAttentionBackend()
    if name == "triton":
        if not triton_available():
            raise ValueError("attention backend 'triton' needs the triton package (pip install triton)")
        from herd.attention.backends.triton import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
