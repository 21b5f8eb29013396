"""One folder per attention backend: reference (torch, readable), sdpa (torch, default on CPU), triton."""
