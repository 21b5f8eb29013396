"""Engine flags shared by `herd serve`, `generate`, `chat`, `bench` and `eval`: vLLM's names, each
in both spellings (`--max-model-len` and `--max_model_len`), as vLLM accepts them."""
from __future__ import annotations

import argparse
import sys

# vLLM flags that are accepted so existing launch commands work, but change nothing here.
NOT_NEEDED = {
    "use_v2_block_manager": "herd always uses its paged block manager",
    "trust_remote_code": "herd runs no code from the checkpoint",
    "weights_load_device": "herd always loads and quantizes weights on the CPU, then moves them",
}


def flag(parser, name: str, *extra: str, **kw):
    """Add --a-b and --a_b (and any short aliases) for one option."""
    dashed = "--" + name.replace("_", "-")
    spellings = [dashed] + ([f"--{name}"] if "_" in name else []) + list(extra)
    kw.setdefault("dest", name)
    parser.add_argument(*spellings, **kw)


def bool_flag(parser, name: str, default, help: str):
    dashed = name.replace("_", "-")
    names = [f"--{dashed}", f"--{name}"] if "_" in name else [f"--{dashed}"]
    parser.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help)


def parse_length(text: str) -> int:
    """Token counts like vLLM's: 4096, 4k (4000), 4K (4096), 1m, 1M."""
    units = {"k": 1000, "K": 1024, "m": 10 ** 6, "M": 1 << 20}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid length {text!r} (examples: 4096, 8k, 32K)") from None


def add_model_arg(parser):
    parser.add_argument("model_tag", nargs="?", metavar="MODEL", help="checkpoint folder (default: the embedded model)")
    flag(parser, "model", help="checkpoint folder (same as MODEL)")


def resolve_model(args) -> str | None:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two different models given: {args.model_tag!r} and --model {args.model!r}")
    return args.model_tag or args.model


def add_engine_args(parser: argparse.ArgumentParser):
    e = parser.add_argument_group("engine")
    flag(e, "tokenizer", help="tokenizer folder (default: MODEL)")
    flag(e, "dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    flag(e, "max_model_len", type=parse_length, help="tokens per sequence (default: min(config, 8192))")
    flag(e, "seed", type=int, default=0)
    flag(e, "device", help="cuda | cpu (default: cuda when available)")
    flag(e, "block_size", type=int, help="tokens per KV-cache block (default 128)")
    flag(e, "gpu_memory_utilization", type=float, help="fraction of accelerator memory to use (default 0.9)")
    flag(e, "num_kv_blocks", "--num-gpu-blocks-override", type=int, help="KV-cache blocks per group (skips sizing)")
    flag(e, "cpu_kv_cache_space", type=float, help="GiB of KV cache when running on CPU (default 1)")
    flag(e, "kv_cache_dtype", help="auto | fp8 | fp8_e4m3 | fp8_inc")
    bool_flag(e, "enable_prefix_caching", None, "reuse KV blocks of shared prompt prefixes (default on)")
    flag(e, "max_num_seqs", type=int, help="most sequences per step")
    flag(e, "max_num_batched_tokens", type=int, help="token budget per step")
    bool_flag(e, "enable_chunked_prefill", None, "split long prompts over steps")
    flag(e, "tensor_parallel_size", "-tp", type=int, help="accelerators per model replica")
    flag(e, "distributed_executor_backend", choices=["uni", "mp", "ray"])
    flag(e, "enable_expert_parallel", "-ep", action="store_true", default=None)
    flag(e, "quantization", "-q", help="inc | fp8 | compressed-tensors (default: from the checkpoint)")
    flag(e, "quant_config", help="INC QUANT_CONFIG json for --quantization inc (default: $QUANT_CONFIG)")
    flag(e, "attention_backend", choices=["auto", "reference", "sdpa", "triton"],
         help="auto: triton on CUDA, sdpa on CPU")
    flag(e, "enforce_eager", action="store_true", default=None,
         help="no CUDA graphs or compiled decode (default: graphs on CUDA)")
    flag(e, "compilation_config", "-O", help="level (-O3) or JSON, e.g. '{\"level\": 3, \"backend\": \"inductor\"}'")
    c = parser.add_argument_group("accepted for vLLM compatibility, not needed")
    for name in NOT_NEEDED:
        if name == "weights_load_device":
            flag(c, name)
        else:
            flag(c, name, action="store_true")


def engine_kwargs(args) -> dict:
    """EngineConfig.from_kwargs arguments from parsed flags (unset ones are left to defaults)."""
    for name, why in NOT_NEEDED.items():
        if getattr(args, name, None):
            print(f"notice: --{name.replace('_', '-')} is accepted for vLLM compatibility and not needed: {why}",
                  file=sys.stderr)
    kw = dict(tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
              block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
              num_kv_blocks=args.num_kv_blocks, cpu_kv_cache_space_gib=args.cpu_kv_cache_space,
              kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=args.enable_prefix_caching,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_chunked_prefill=args.enable_chunked_prefill,
              tensor_parallel_size=args.tensor_parallel_size,
              distributed_executor_backend=args.distributed_executor_backend,
              enable_expert_parallel=args.enable_expert_parallel, quantization=args.quantization,
              quant_config_path=args.quant_config, device=args.device,
              served_model_name=getattr(args, "served_model_name", None),
              max_logprobs=getattr(args, "max_logprobs", None), attention_backend=args.attention_backend,
              enforce_eager=args.enforce_eager, compilation_config=args.compilation_config)
    return {k: v for k, v in kw.items() if v is not None}
