"""Engine flags shared by `herd serve`, `generate`, `chat`, `bench` and `eval` (vLLM's names; both
dash and underscore spellings are accepted, as vLLM does)."""
from __future__ import annotations

import argparse
import sys

# Flags vLLM users pass that herd does not need: accepted with a notice.
IGNORED_FLAGS = {"--trust-remote-code": 0, "--use-v2-block-manager": 0, "--enforce-eager": 0,
                 "--disable-log-stats": 0, "--weights-load-device": 1}


def _opt(parser, name: str, *aliases: str, **kw):
    spellings = [name, *aliases]
    if "-" in name[2:]:
        spellings.append("--" + name[2:].replace("-", "_"))
    parser.add_argument(*spellings, **kw)


def add_model_arg(parser, required: bool = False):
    parser.add_argument("model_pos", nargs="?" if not required else None, metavar="MODEL",
                        help="Hugging Face checkpoint folder (default: the embedded model)")
    _opt(parser, "--model", dest="model_opt", default=None, help="checkpoint folder (same as MODEL)")


def add_engine_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("engine")
    _opt(g, "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "half", "float"],
         help="weight and activation dtype (auto = the checkpoint's)")
    _opt(g, "--max-model-len", type=int, default=None, help="context length (prompt + output)")
    _opt(g, "--tensor-parallel-size", "-tp", type=int, default=1, help="number of tensor-parallel ranks")
    _opt(g, "--distributed-executor-backend", default=None, choices=["mp", "ray", "uni"],
         help="how ranks are run: mp (processes, default) or ray")
    _opt(g, "--enable-expert-parallel", action="store_true", help="split MoE experts across ranks")
    _opt(g, "--block-size", type=int, default=None, help="tokens per KV-cache block (default 128)")
    _opt(g, "--gpu-memory-utilization", type=float, default=None,
         help="fraction of GPU memory for weights, activations and KV cache (default 0.9)")
    _opt(g, "--num-kv-blocks", type=int, default=None, help="KV-cache blocks per group (overrides sizing)")
    _opt(g, "--cpu-kv-cache-space", dest="cpu_kv_cache_space_gib", type=float, default=None,
         help="GiB of KV cache on CPU (default 1)")
    _opt(g, "--kv-cache-dtype", default=None, choices=["auto", "fp8", "fp8_e4m3", "fp8_inc"],
         help="KV-cache dtype (fp8_inc uses INC measured scales)")
    _opt(g, "--quantization", "-q", default=None, choices=["inc", "fp8", "compressed-tensors"],
         help="weight quantization (inc reads QUANT_CONFIG)")
    _opt(g, "--quant-config", dest="quant_config_path", default=None,
         help="INC QUANT_CONFIG json (default: $QUANT_CONFIG)")
    _opt(g, "--max-num-seqs", type=int, default=None, help="most sequences per step (default 256)")
    _opt(g, "--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    _opt(g, "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
         help="reuse KV blocks of shared prefixes (default on)")
    _opt(g, "--seed", type=int, default=None, help="random seed")
    _opt(g, "--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    for flag, nargs in IGNORED_FLAGS.items():
        _opt(g, flag, dest="ignored_" + flag[2:].replace("-", "_"),
             action="store_true" if nargs == 0 else "store", help=argparse.SUPPRESS)


def resolve_model(args) -> str | None:
    return getattr(args, "model_opt", None) or getattr(args, "model_pos", None)


def engine_kwargs(args) -> dict:
    for flag in IGNORED_FLAGS:
        if getattr(args, "ignored_" + flag[2:].replace("-", "_"), None):
            print(f"herd: note: {flag} is accepted for vLLM compatibility and not needed by herd",
                  file=sys.stderr)
    keys = ["dtype", "max_model_len", "tensor_parallel_size", "distributed_executor_backend",
            "enable_expert_parallel", "block_size", "gpu_memory_utilization", "num_kv_blocks",
            "cpu_kv_cache_space_gib", "kv_cache_dtype", "quantization", "quant_config_path", "max_num_seqs",
            "max_num_batched_tokens", "enable_prefix_caching", "seed", "device"]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
