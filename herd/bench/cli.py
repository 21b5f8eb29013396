"""`herd bench {serve,throughput,latency}`, as `vllm bench`."""
from __future__ import annotations

import importlib

BENCHMARKS = {
    "serve": ("herd.bench.serve", "load an OpenAI-compatible server and report TTFT/TPOT/ITL/E2EL"),
    "throughput": ("herd.bench.throughput", "offline generation throughput (herd or transformers)"),
    "latency": ("herd.bench.latency", "latency of one batch, prompt to last token"),
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_bench_module=module)
        importlib.import_module(module).add_arguments(p)


def run(args) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)
