"""GGUF (llama.cpp) files: converted once into a Hugging Face checkpoint folder that herd loads."""
from herd.gguf.convert import convert_gguf, gguf_cache_dir, gguf_to_hf, is_gguf_path

__all__ = ["convert_gguf", "gguf_cache_dir", "gguf_to_hf", "is_gguf_path"]
