"""`herd serve [MODEL] [flags]`: the OpenAI-compatible HTTP server, with `vllm serve`'s flags.

Every flag takes both spellings (`--max-model-len` and `--max_model_len`), as vLLM's do.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

from herd.engine.arg_utils import add_engine_args, add_model_arg, engine_kwargs, flag, resolve_model
from herd.server.limits import (DEFAULT_BODY_READ_TIMEOUT, DEFAULT_H11_MAX_INCOMPLETE_EVENT_SIZE,
                                DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_LIMIT_CONCURRENCY,
                                DEFAULT_MAX_REQUEST_BODY_BYTES, DEFAULT_TIMEOUT_KEEP_ALIVE)

logger = logging.getLogger("herd.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arg(parser)
    g = parser.add_argument_group("server")
    flag(g, "host", default="0.0.0.0", help="address to listen on ('::' for IPv6)")
    flag(g, "port", type=int, default=8000)
    flag(g, "served_model_name", nargs="+", help="name(s) clients use in `model` (default: MODEL)")
    flag(g, "api_key", help="require `Authorization: Bearer KEY` on /v1 (default: $HERD_API_KEY)")
    flag(g, "chat_template", help="chat template file or inline Jinja (default: the tokenizer's)")
    flag(g, "trust_request_chat_template", action="store_true",
          help="allow requests to bring their own chat_template")
    flag(g, "response_role", default="assistant", help="role of generated chat messages")
    flag(g, "allowed_local_media_path", help="folder image_url file:// paths may read from (default: none)")
    flag(g, "enable_remote_media", action="store_true",
         help="fetch http(s) image URLs (off by default; private and loopback addresses are always refused)")
    flag(g, "max_logprobs", type=int, default=20, help="largest logprobs / top_logprobs a request may ask")
    flag(g, "enable_log_requests", action="store_true", help="log each request's prompt size and params")
    flag(g, "disable_log_requests", action="store_true", help="do not log requests (the default)")
    flag(g, "disable_log_stats", action="store_true", help="no periodic throughput / KV-cache log line")
    flag(g, "uvicorn_log_level", default="info",
          choices=["critical", "error", "warning", "info", "debug", "trace"])
    flag(g, "disable_uvicorn_access_log", action="store_true")
    flag(g, "max_request_body_bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
          help="refuse larger request bodies with 413 (0: no limit; default 32 MiB)")
    flag(g, "timeout_keep_alive", type=int, default=DEFAULT_TIMEOUT_KEEP_ALIVE,
         help="close an idle keep-alive connection after this many seconds (default 5)")
    flag(g, "header_read_timeout", type=float, default=DEFAULT_HEADER_READ_TIMEOUT,
         help="close a connection that has not sent a complete request head this many seconds after "
              "it opened or after its previous response (slowloris; default 10)")
    flag(g, "body_read_timeout", type=float, default=DEFAULT_BODY_READ_TIMEOUT,
         help="answer 408 and close when a request body takes longer than this to arrive (default 60)")
    flag(g, "limit_concurrency", type=int, default=DEFAULT_LIMIT_CONCURRENCY,
         help="most open connections plus running requests; beyond it new requests get 503 "
              "(0: no limit; default 2048)")
    flag(g, "h11_max_incomplete_event_size", type=int, default=DEFAULT_H11_MAX_INCOMPLETE_EVENT_SIZE,
         help="largest request head in bytes (default 16 KiB)")
    flag(g, "stream_write_timeout", type=float, default=60.0,
         help="drop a streaming client that takes no data for this many seconds, aborting its "
              "requests and freeing their KV blocks (0: wait forever; default 60)")
    flag(g, "shutdown_timeout", type=float, default=30.0,
          help="on SIGTERM stop accepting connections and let in-flight requests finish for up to "
               "this many seconds, then cancel them (default 30)")
    add_engine_args(parser)


def resolve_args(args) -> None:
    """Fill defaults that depend on other flags or the environment; print compatibility notices."""
    from herd.config import api_key_from_env
    from herd.hub.default import default_model_path

    args.model = resolve_model(args)
    if args.model is None:
        args.model = default_model_path()
        if not args.served_model_name:
            args.served_model_name = ["default"]
    if args.api_key is None:
        args.api_key = api_key_from_env()
    elif not args.api_key.strip():
        raise ValueError("--api-key is empty; give the key, or leave the flag out to serve without "
                         "authentication")
    for name in ("timeout_keep_alive", "header_read_timeout", "body_read_timeout", "limit_concurrency",
                 "stream_write_timeout"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.h11_max_incomplete_event_size <= 0:
        raise ValueError("--h11-max-incomplete-event-size must be > 0")
    if args.max_request_body_bytes < 0:
        raise ValueError(f"--max-request-body-bytes must be >= 0, got {args.max_request_body_bytes}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.chat_template and os.path.isfile(args.chat_template):
        with open(args.chat_template, encoding="utf-8") as f:
            args.chat_template = f.read()


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


def release_freed_memory() -> None:
    """Give the heap pages freed while loading (checkpoint reads, dtype conversions) back to the OS;
    glibc keeps them in its arenas otherwise. A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def uvicorn_config(app, args):
    import uvicorn

    from herd.server.timeouts import header_timeout_protocol

    return uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log, timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=args.shutdown_timeout,
        http=header_timeout_protocol(args.header_read_timeout) if args.header_read_timeout else "h11",
        limit_concurrency=args.limit_concurrency or None,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size)


def run(args) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C while loading: no traceback
        print("herd serve: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    import uvicorn

    from herd.config import EngineConfig
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.server.app import build_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        resolve_args(args)
        config = EngineConfig.from_kwargs(args.model, **engine_kwargs(args))
        engine = AsyncLLMEngine(config)
        release_freed_memory()
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"herd serve: error: {e}", file=sys.stderr)
        return 2
    try:
        app = build_app(engine, args)
        server = uvicorn.Server(uvicorn_config(app, args))
        # uvicorn drains on SIGTERM and SIGINT, then raises the signal again with the handler found
        # here; a no-op handler lets the engine shut down and the process exit 0 after a clean drain
        # (Python's own SIGINT handler would raise KeyboardInterrupt: a traceback and status -2).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: None)
            signal.signal(signal.SIGINT, lambda *_: None)
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
