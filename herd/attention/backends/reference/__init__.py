"""The readable torch reference backend (herd.ops.attention): a Python loop over sequences,
host reads included. Every other backend is tested against it."""
from herd.attention.backends.reference.backend import ReferenceAttentionBackend

__all__ = ["ReferenceAttentionBackend"]
