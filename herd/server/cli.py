"""`herd serve [MODEL] [flags]`: the OpenAI-compatible HTTP server, with `vllm serve`'s flags.

Every flag takes both spellings (`--max-model-len` and `--max_model_len`), as vLLM's do.
"""
from __future__ import annotations

import argparse
import asyncio
import json
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


def json_list(text: str) -> list[str]:
    """--allowed-origins and friends: a JSON list of strings, as vLLM takes them."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); give a JSON list like '[\"*\"]'") from None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings like '[\"*\"]', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arg(parser)
    g = parser.add_argument_group("server")
    flag(g, "host", default="0.0.0.0", help="address to listen on ('::' for IPv6)")
    flag(g, "port", type=int, default=8000)
    flag(g, "served_model_name", nargs="+", help="name(s) clients use in `model` (default: MODEL)")
    flag(g, "api_key", nargs="+", metavar="KEY",
         help="require `Authorization: Bearer KEY` on /v1; several keys: any of them (default: $HERD_API_KEY)")
    flag(g, "chat_template", help="chat template file, inline Jinja, or a shipped one: llama4_pythonic, "
                                   "llama4_json (default: the tokenizer's)")
    flag(g, "enable_auto_tool_choice", action="store_true",
         help="parse tool calls out of replies when tool_choice is auto (needs --tool-call-parser)")
    flag(g, "tool_call_parser", help="tool-call format of the model: llama4_pythonic, llama4_json, pythonic, hermes")
    flag(g, "trust_request_chat_template", action="store_true",
          help="allow requests to bring their own chat_template")
    flag(g, "response_role", default="assistant", help="role of generated chat messages")
    flag(g, "return_tokens_as_token_ids", action="store_true",
         help="logprobs name tokens as 'token_id:N' in every response (as the request field does)")
    flag(g, "lora_modules", nargs="+", help="LoRA adapters: not supported (herd fails with a message)")
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
    h = parser.add_argument_group("HTTP: CORS, proxy prefix, TLS")
    flag(h, "allowed_origins", type=json_list, default=["*"], help='CORS origins, a JSON list (default ["*"])')
    flag(h, "allowed_methods", type=json_list, default=["*"], help='CORS methods, a JSON list (default ["*"])')
    flag(h, "allowed_headers", type=json_list, default=["*"], help='CORS headers, a JSON list (default ["*"])')
    flag(h, "allow_credentials", action="store_true", help="CORS: allow credentials (cookies, auth headers)")
    flag(h, "root_path", help="path prefix under which a path-based proxy serves the app (FastAPI root_path)")
    flag(h, "ssl_keyfile", help="TLS private key file (PEM); serve HTTPS")
    flag(h, "ssl_certfile", help="TLS certificate file (PEM); serve HTTPS")
    flag(h, "ssl_ca_certs", help="CA certificates file for verifying client certificates")
    flag(h, "ssl_cert_reqs", type=int, default=0,
         help="client certificates: 0 not asked (default), 1 optional, 2 required (Python's ssl.CERT_*)")
    add_process_args(parser)
    add_engine_args(parser)


def add_process_args(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("processes (docs/architecture.md)")
    p.add_argument("--frontend-multiprocessing", "--frontend_multiprocessing", dest="frontend_multiprocessing",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine core in its own process behind the API server (the default; "
                        "$HERD_ENABLE_MULTIPROCESSING=0 or $VLLM_ENABLE_V1_MULTIPROCESSING=0 turn the default off)")
    flag(p, "disable_frontend_multiprocessing", action="store_true",
         help="vLLM's flag: the engine in the API server process (as --no-frontend-multiprocessing)")
    flag(p, "data_parallel_size", "-dp", type=int, default=1,
         help="model replicas, each an engine core process with its own tensor-parallel group, behind "
              "the same API server(s); requests go to the least loaded, or to the one caching their prefix")
    flag(p, "api_server_count", "-asc", type=int, default=1,
         help="API server processes sharing the port in front of the engine core(s)")


def frontend_multiprocessing(args, use_env: bool = True) -> tuple[bool, str]:
    """(split, why): whether the engine core runs in processes of its own (the split server) and
    what decided it: "default", or the flag or environment variable that did (`use_env=False`:
    the flags alone, without importing herd.config and torch)."""
    dp, asc = getattr(args, "data_parallel_size", 1), getattr(args, "api_server_count", 1)
    if dp < 1 or asc < 1:
        raise ValueError("--data-parallel-size and --api-server-count must be >= 1")
    wanted = getattr(args, "frontend_multiprocessing", None)
    why = "--frontend-multiprocessing" if wanted else "--no-frontend-multiprocessing"
    if getattr(args, "disable_frontend_multiprocessing", False):
        if wanted:
            raise ValueError("--frontend-multiprocessing and --disable-frontend-multiprocessing contradict")
        wanted, why = False, "--disable-frontend-multiprocessing"
    if dp > 1 or asc > 1:
        if wanted is False:
            raise ValueError("--data-parallel-size and --api-server-count above 1 need the engine core in its own "
                             f"process; drop {why}")
        return True, "--data-parallel-size" if dp > 1 else "--api-server-count"
    if wanted is not None:
        return wanted, why
    if use_env:
        from herd.config import multiprocessing_from_env

        env = multiprocessing_from_env()  # vLLM's switch; a flag overrides it
        if env is not None:
            return env[1], f"${env[0]}={int(env[1])}"
    return True, "default"


def _import_http_stack() -> None:
    """Imported while the engine cores load, not after: the server's FastAPI app and uvicorn."""
    import uvicorn  # noqa: F401

    import herd.server.app  # noqa: F401


def resolve_args(args) -> None:
    """Fill defaults that depend on other flags or the environment; print compatibility notices."""
    from herd.config import api_key_from_env
    from herd.multimodal.chat import resolve_chat_template
    from herd.server.tool_parsers import get_tool_parser
    from herd.hub.default import default_model_path

    args.model = resolve_model(args)
    if args.model is None:
        args.model = default_model_path()
        if not args.served_model_name:
            args.served_model_name = ["default"]
    if args.api_key is None:
        key = api_key_from_env()
        args.api_key = None if key is None else [key]
    elif any(not key.strip() for key in args.api_key):
        raise ValueError("--api-key is empty; give the key, or leave the flag out to serve without "
                         "authentication")
    if args.lora_modules:
        raise NotImplementedError("herd does not support LoRA adapters (--lora-modules)")
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
    if args.ssl_keyfile and not args.ssl_certfile:
        raise ValueError("--ssl-keyfile needs --ssl-certfile")
    for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')}: no such file {path!r}")
    if args.ssl_cert_reqs not in (0, 1, 2):
        raise ValueError(f"--ssl-cert-reqs must be 0, 1 or 2, got {args.ssl_cert_reqs}")
    args.chat_template = resolve_chat_template(args.chat_template)
    if args.tool_call_parser is not None:
        get_tool_parser(args.tool_call_parser)  # ValueError naming the parsers there are
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")


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
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        ssl_keyfile=getattr(args, "ssl_keyfile", None), ssl_certfile=getattr(args, "ssl_certfile", None),
        ssl_ca_certs=getattr(args, "ssl_ca_certs", None), ssl_cert_reqs=getattr(args, "ssl_cert_reqs", 0))


def run(args) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C while loading: no traceback
        print("herd serve: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    from herd.engine.core_procs import EngineCoreDied, EngineCoreProcs, SplitUnavailable

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    procs = None
    try:
        unavailable = None
        if frontend_multiprocessing(args, use_env=False)[0]:
            try:  # first thing: the cores import torch and the engine while this process does too
                procs = EngineCoreProcs(args.data_parallel_size, args.api_server_count)
            except SplitUnavailable as e:
                unavailable = e
        split, why = frontend_multiprocessing(args)  # the environment may say otherwise
        if not split and procs is not None:
            procs.shutdown()
            procs = None
        if split and procs is None:
            split, why = _in_process_instead(unavailable, why)
        resolve_args(args)
        from herd.config import EngineConfig
        config = EngineConfig.from_kwargs(args.model, **engine_kwargs(args))
        engine = None
        if split:
            procs.start(config)
            if args.api_server_count > 1:
                procs.wait_ready()
            else:
                try:
                    engine = _split_front_end(config, procs, why)
                except SplitUnavailable as e:  # the processes are stopped
                    procs = None
                    split, why = _in_process_instead(e, why)
        if not split:
            logger.info("engine in the API server process (%s)", why)
            from herd.engine.async_engine import AsyncLLMEngine
            engine = AsyncLLMEngine(config)
        release_freed_memory()
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, SplitUnavailable) as e:
        if procs is not None:
            procs.shutdown()
        print(f"herd serve: error: {e}", file=sys.stderr)
        return 2
    except EngineCoreDied as e:  # the processes are stopped
        print(f"herd serve: error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        if procs is not None:
            procs.shutdown()
        raise
    if engine is None:
        return run_api_servers(args, config, procs)
    return serve_app(args, engine)


def _in_process_instead(error: Exception, why: str) -> tuple[bool, str]:
    """Engine core processes cannot run here: an error when they were asked for, else a warning
    and the in-process layout."""
    if why != "default":
        raise error
    logger.warning("%s; running the engine in the API server process instead", error)
    return False, "engine core processes are unavailable"


def _split_front_end(config, procs, why: str):
    """The API server's AsyncLLM over `procs`: its tokenizer and structured-output setup (and the
    HTTP stack's imports) done while the cores load."""
    from herd.engine.core_client import AsyncLLM, FrontendProcessor

    frontend = FrontendProcessor(config)
    _import_http_stack()
    try:
        group = procs.wait_ready()
    except BaseException:
        frontend.structured_output.shutdown()
        raise
    pids = [str(c.pid) for c in group.cores]
    logger.info("engine core process%s: pid %s (%s)", "es" if len(pids) > 1 else "", ", ".join(pids),
                "the default; --disable-frontend-multiprocessing runs the engine in this process"
                if why == "default" else why)
    return AsyncLLM(config, group, 0, owned=procs, frontend=frontend)


def serve_app(args, engine, sockets=None) -> int:
    """Serve HTTP over `engine` until SIGTERM/SIGINT (exit status 0) or the engine dies (1)."""
    import uvicorn

    from herd.server.app import build_app

    try:
        app = build_app(engine, args)
        server = uvicorn.Server(uvicorn_config(app, args))
        # uvicorn drains on SIGTERM and SIGINT, then raises the signal again with the handler found
        # here; a no-op handler lets the engine shut down and the process exit 0 after a clean drain
        # (Python's own SIGINT handler would raise KeyboardInterrupt: a traceback and status -2).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: None)
            signal.signal(signal.SIGINT, lambda *_: None)
        from herd.hub.default import default_model_path
        what = "the embedded default model (5.6M-parameter Llama 4)" if args.model == default_model_path() else args.model
        logger.info("serving %s as %s on %s://%s:%d%s", what, ", ".join(app.state.settings.served_model_names),
                    "https" if args.ssl_certfile else "http", f"[{args.host}]" if ":" in args.host else args.host,
                    args.port, args.root_path or "")

        async def main() -> bool:
            watcher = asyncio.create_task(watch_engine(
                engine, server, stats_every=None if args.disable_log_stats else 10.0))
            try:
                await server.serve(sockets=sockets)
            finally:
                watcher.cancel()
            return engine.errored is not None

        died = asyncio.run(main())
    finally:
        engine.shutdown()
    return 1 if died else 0


def _listen_socket(host: str, port: int):
    """The listening socket the API server processes share (the kernel hands each connection to
    one of them), bound here so that a taken port fails before anything starts."""
    import socket

    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(2048)
    return sock


def _api_server_main(args, config, group, index: int, sock) -> None:
    """One of --api-server-count API server processes: a front end (AsyncLLM) over the shared
    engine cores, serving HTTP on the inherited socket."""
    from herd.engine.core_client import AsyncLLM

    logging.basicConfig(level=logging.INFO,
                        format=f"%(levelname)s %(asctime)s APIServer_{index} %(name)s: %(message)s")
    engine = AsyncLLM(config, group, index)
    release_freed_memory()
    sys.exit(serve_app(args, engine, sockets=[sock]))


def run_api_servers(args, config, cores) -> int:
    """--api-server-count N: start N API server processes in front of the engine cores and watch
    them. SIGTERM / SIGINT are passed on (each drains); when one exits, the others are stopped too.
    Exit status 1 when any of them failed (e.g. its engine core died), else 0."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    procs = []
    stopping = threading.Event()

    def stop_all(*_):
        stopping.set()
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    try:
        try:
            sock = _listen_socket(args.host, args.port)
        except OSError as e:
            print(f"herd serve: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
            return 2
        ctx = mp.get_context("spawn")
        for i in range(args.api_server_count):
            proc = ctx.Process(target=_api_server_main, args=(args, config, cores.group, i, sock),
                               name=f"herd-api-server-{i}")
            proc.start()
            procs.append(proc)
        sock.close()  # the API servers hold it now; closed there, the port closes
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, stop_all)
            signal.signal(signal.SIGINT, stop_all)
        logger.info("%d API servers (pids %s) on %s:%d over %d engine core(s)", len(procs),
                    ", ".join(str(p.pid) for p in procs), args.host, args.port, len(cores.group.cores))
        failed, live = False, list(procs)
        while live:
            ready = wait([p.sentinel for p in live])
            for proc in [p for p in live if p.sentinel in ready]:
                proc.join()
                live.remove(proc)
                # (one still starting when asked to stop has no handler yet and dies of SIGTERM)
                if proc.exitcode != 0 and not (stopping.is_set() and proc.exitcode == -signal.SIGTERM):
                    logger.error("API server %s exited with %s", proc.name, proc.exitcode)
                    failed = True
                if not stopping.is_set():
                    stop_all()
        return 1 if failed else 0
    finally:
        for proc in procs:
            proc.join(args.shutdown_timeout + 10)
            if proc.is_alive():
                proc.kill()
        cores.shutdown()
