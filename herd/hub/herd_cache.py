"""herd's own cache folder: $HERD_CACHE, else $XDG_CACHE_HOME/herd, else ~/.cache/herd. It holds
what herd derives once per machine: converted GGUF checkpoints (gguf/), compiled CPU kernels
(kernels/)."""
from __future__ import annotations

import os


def herd_cache_dir(*parts: str) -> str:
    root = os.environ.get("HERD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "herd")
    return os.path.join(root, *parts)
