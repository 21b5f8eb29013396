"""`python -m herd.entrypoints.openai.api_server --model MODEL [flags]`: the module path vLLM guides
use (`python -m vllm.entrypoints.openai.api_server`); the same as `herd serve` with the same flags."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from herd.cli import main as herd_main

    return herd_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
