"""`herd serve [MODEL] [flags]`: the OpenAI-compatible HTTP server, with `vllm serve`'s flags.

Every flag takes both spellings (`--max-model-len` and `--max_model_len`), as vLLM's do.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

logger = logging.getLogger("herd.serve")

# vLLM flags that are accepted so existing launch commands work, but change nothing here.
_NOT_NEEDED = {
    "use_v2_block_manager": "herd always uses its paged block manager",
    "trust_remote_code": "herd runs no code from the checkpoint",
}


def _flag(parser, name: str, *extra: str, **kw):
    """Add --a-b and --a_b (and any short aliases) for one option."""
    dashed = "--" + name.replace("_", "-")
    spellings = [dashed] + ([f"--{name}"] if "_" in name else []) + list(extra)
    kw.setdefault("dest", name)
    parser.add_argument(*spellings, **kw)


def _bool_flag(parser, name: str, default, help: str):
    dashed = name.replace("_", "-")
    names = [f"--{dashed}", f"--{name}"] if "_" in name else [f"--{dashed}"]
    parser.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help)


def _length(text: str) -> int:
    """Token counts like vLLM's: 4096, 4k (4000), 4K (4096), 1m, 1M."""
    units = {"k": 1000, "K": 1024, "m": 10 ** 6, "M": 1 << 20}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid length {text!r} (examples: 4096, 8k, 32K)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", metavar="MODEL",
                        help="checkpoint folder (default: the embedded model)")
    _flag(parser, "model", help="checkpoint folder (same as MODEL)")
    g = parser.add_argument_group("server")
    _flag(g, "host", default="0.0.0.0", help="address to listen on ('::' for IPv6)")
    _flag(g, "port", type=int, default=8000)
    _flag(g, "served_model_name", nargs="+", help="name(s) clients use in `model` (default: MODEL)")
    _flag(g, "api_key", help="require `Authorization: Bearer KEY` on /v1 (default: $HERD_API_KEY)")
    _flag(g, "chat_template", help="chat template file or inline Jinja (default: the tokenizer's)")
    _flag(g, "trust_request_chat_template", action="store_true",
          help="allow requests to bring their own chat_template")
    _flag(g, "response_role", default="assistant", help="role of generated chat messages")
    _flag(g, "max_logprobs", type=int, default=20, help="largest logprobs / top_logprobs a request may ask")
    _flag(g, "enable_log_requests", action="store_true", help="log each request's prompt size and params")
    _flag(g, "disable_log_requests", action="store_true", help="do not log requests (the default)")
    _flag(g, "disable_log_stats", action="store_true", help="no periodic throughput / KV-cache log line")
    _flag(g, "uvicorn_log_level", default="info",
          choices=["critical", "error", "warning", "info", "debug", "trace"])
    _flag(g, "disable_uvicorn_access_log", action="store_true")
    e = parser.add_argument_group("engine")
    _flag(e, "tokenizer", help="tokenizer folder (default: MODEL)")
    _flag(e, "dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    _flag(e, "max_model_len", type=_length, help="tokens per sequence (default: min(config, 8192))")
    _flag(e, "seed", type=int, default=0)
    _flag(e, "device", help="cuda | cpu (default: cuda when available)")
    _flag(e, "block_size", type=int, help="tokens per KV-cache block")
    _flag(e, "gpu_memory_utilization", type=float, help="fraction of accelerator memory to use")
    _flag(e, "num_kv_blocks", "--num-gpu-blocks-override", type=int, help="KV-cache blocks (skips sizing)")
    _flag(e, "cpu_kv_cache_space", type=float, help="GiB of KV cache when running on CPU")
    _flag(e, "kv_cache_dtype", help="auto | fp8 | fp8_e4m3 | fp8_inc")
    _bool_flag(e, "enable_prefix_caching", None, "reuse KV blocks of shared prompt prefixes")
    _flag(e, "max_num_seqs", type=int, help="most sequences per step")
    _flag(e, "max_num_batched_tokens", type=int, help="token budget per step")
    _bool_flag(e, "enable_chunked_prefill", None, "split long prompts over steps")
    _flag(e, "tensor_parallel_size", "-tp", type=int, help="accelerators per model replica")
    _flag(e, "distributed_executor_backend", choices=["uni", "mp", "ray"])
    _flag(e, "enable_expert_parallel", "-ep", action="store_true", default=None)
    _flag(e, "quantization", "-q", help="inc | fp8 | compressed-tensors (default: from the checkpoint)")
    c = parser.add_argument_group("accepted for vLLM compatibility, not needed")
    _flag(c, "use_v2_block_manager", action="store_true")
    _flag(c, "trust_remote_code", action="store_true")


def engine_kwargs(args) -> dict:
    space = args.cpu_kv_cache_space
    return dict(tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                served_model_name=args.served_model_name, block_size=args.block_size,
                gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
                cpu_kv_cache_space_gib=space, kv_cache_dtype=args.kv_cache_dtype,
                enable_prefix_caching=args.enable_prefix_caching, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_chunked_prefill=args.enable_chunked_prefill,
                tensor_parallel_size=args.tensor_parallel_size,
                distributed_executor_backend=args.distributed_executor_backend,
                enable_expert_parallel=args.enable_expert_parallel, quantization=args.quantization,
                device=args.device)


def resolve_args(args) -> None:
    """Fill defaults that depend on other flags or the environment; print compatibility notices."""
    from herd.config import api_key_from_env
    from herd.engine.llm import default_model_path

    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two different models given: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model_tag or args.model
    if args.model is None:
        args.model = default_model_path()
        if not args.served_model_name:
            args.served_model_name = ["default"]
    if args.api_key is None:
        args.api_key = api_key_from_env()
    if args.chat_template and os.path.isfile(args.chat_template):
        with open(args.chat_template, encoding="utf-8") as f:
            args.chat_template = f.read()
    for name, why in _NOT_NEEDED.items():
        if getattr(args, name):
            print(f"notice: --{name.replace('_', '-')} is accepted for vLLM compatibility and not needed: {why}",
                  file=sys.stderr)


async def watch_engine(engine, server, interval: float = 0.5, stats_every: float | None = 10.0) -> bool:
    """Stop the server when the engine dies (returns True then); log stats every `stats_every` s."""
    loop = asyncio.get_running_loop()
    last_log, last = loop.time(), engine.get_stats()
    while not server.should_exit:
        if engine.errored is not None or not engine.is_running:
            logger.error("the engine has stopped (%r); shutting the server down", engine.errored)
            server.should_exit = True
            return True
        if stats_every and loop.time() - last_log >= stats_every:
            s, dt = engine.get_stats(), loop.time() - last_log
            if s.num_running or s.num_waiting or s.generation_tokens != last.generation_tokens:
                logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%",
                            (s.prompt_tokens - last.prompt_tokens) / dt,
                            (s.generation_tokens - last.generation_tokens) / dt,
                            s.num_running, s.num_waiting, 100 * s.kv_cache_usage)
            last_log, last = loop.time(), s
        await asyncio.sleep(interval)
    return False


def run(args) -> int:
    import uvicorn

    from herd.config import EngineConfig
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.server.app import build_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        resolve_args(args)
        config = EngineConfig.from_kwargs(args.model, **engine_kwargs(args))
        engine = AsyncLLMEngine(config)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"herd serve: error: {e}", file=sys.stderr)
        return 2
    try:
        app = build_app(engine, args)
        server = uvicorn.Server(uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log, timeout_keep_alive=5))
        logger.info("serving %s as %s on http://%s:%d", args.model, ", ".join(app.state.settings.served_model_names),
                    f"[{args.host}]" if ":" in args.host else args.host, args.port)

        async def main() -> bool:
            watcher = asyncio.create_task(watch_engine(
                engine, server, stats_every=None if args.disable_log_stats else 10.0))
            try:
                await server.serve()
            finally:
                watcher.cancel()
            return engine.errored is not None

        died = asyncio.run(main())
    finally:
        engine.shutdown()
    return 1 if died else 0
