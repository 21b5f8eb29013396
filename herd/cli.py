"""`herd` command line: each subcommand lives next to the code it drives.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; modules are imported
only when their subcommand runs, so `herd plan` stays light.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "serve": ("herd.server.cli", "OpenAI-compatible HTTP server (flags of `vllm serve`)"),
    "generate": ("herd.engine.cli_generate", "generate a completion for one prompt"),
    "chat": ("herd.engine.cli_chat", "interactive chat in the terminal (streams)"),
    "plan": ("herd.plan.cli", "will this model fit on these accelerators, and how fast at best"),
    "calibrate": ("herd.quant.inc.calibrate", "INC-compatible FP8 calibration (measure, unify, scales)"),
    "quantize": ("herd.quant.compressed_tensors.quantize", "one-shot FP8 export in the compressed-tensors format"),
    "bench": ("herd.bench.cli", "serving / throughput / latency benchmarks"),
    "eval": ("herd.bench.eval_cli", "perplexity and FP8 accuracy recovery"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Llama 4 inference, serving and FP8 toolchain")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen subcommand pays for its imports
            p.set_defaults(_module=module)
            importlib.import_module(module).add_arguments(p)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return sub.choices.get(name) if sub is not None and name else None


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, plus: positionals may come after flags (`herd generate MODEL --max-tokens 5 "hi"`),
    and `--config FILE` (YAML, vLLM's) adds the flags the command line does not give."""
    args, extra = parser.parse_known_args(argv)
    sub = _subparser(parser, getattr(args, "command", None))
    if sub is not None and getattr(args, "config", None):
        from herd.engine.arg_utils import config_file_args

        have_model = bool(getattr(args, "model_tag", None) or getattr(args, "model", None))
        try:
            argv = argv + config_file_args(args.config, sub, argv, have_model)
        except ValueError as e:
            sub.error(str(e))
        args, extra = parser.parse_known_args(argv)
    if sub is not None and extra and not any(x.startswith("-") for x in extra):
        # positionals split by flags: parse the subcommand's part with flags and positionals intermixed
        rest = argv[argv.index(args.command) + 1:]
        try:
            vars(args).update(vars(sub.parse_intermixed_args(rest)))
            extra = []
        except TypeError:  # a parser shape intermixed parsing does not support
            pass
    if extra:
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parse(parser, argv)
    if args.version:
        from herd import __version__
        print(__version__)
        return 0
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
