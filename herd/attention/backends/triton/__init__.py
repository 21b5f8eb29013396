"""Triton backend (default on CUDA): paged decode with split-K (flash-decoding) and a varlen paged
prefill kernel with chunked prefill, chunk-local windows, GQA and FP8 KV scales in the kernel.
Runs on CPU under TRITON_INTERPRET=1 for tests."""
from herd.attention.backends.triton.backend import TritonAttentionBackend

__all__ = ["TritonAttentionBackend"]
