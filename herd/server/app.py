"""The FastAPI app: routes of vLLM's OpenAI-compatible server over one AsyncLLMEngine."""
from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import Match

from herd import __version__
from herd.multimodal.media import MediaConnector
from herd.server.limits import DEFAULT_BODY_READ_TIMEOUT, DEFAULT_MAX_REQUEST_BODY_BYTES
from herd.server.errors import OpenAIError, error_body, install_error_handlers
from herd.server.metrics import ServerMetrics
from herd.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from herd.server.serving import DEFAULT_STREAM_WRITE_TIMEOUT, OpenAIServing, ServerSettings
from herd.server.serving_chat import OpenAIServingChat, render_chat
from herd.server.serving_completion import OpenAIServingCompletion
from herd.server.serving_responses import OpenAIServingResponses, ResponsesRequest

# Paths that need the API key: vLLM's prefixes, plus /tokenize and /detokenize, which spend
# tokenizer time on the caller's input (/health, /metrics, /version, /ping, /load stay open).
_GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/tokenize", "/detokenize")
# Handlers vLLM leaves out of the HTTP request metrics.
_UNMETERED = ("/metrics", "/health", "/load", "/ping", "/version", "/server_info")


def route_path(scope) -> str:
    """The path the routes see: with --root-path, a request that still carries the prefix (a proxy
    that does not strip it) is routed without it, so the API-key check must look at it that way too."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


class APIKeyMiddleware:
    """401 on guarded paths unless `Authorization: Bearer <key>` matches (constant-time compare; the
    scheme is case-insensitive, so `bearer <key>` works too). A plain ASGI middleware, so streaming
    responses and disconnects pass through untouched."""

    def __init__(self, app, api_key: str | list[str]):
        self.app = app
        self.expected = [k.encode() for k in ([api_key] if isinstance(api_key, str) else api_key)]

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # every key is compared (no early exit), so timing does not tell which one nearly matched
        return any([secrets.compare_digest(token.strip(), key) for key in self.expected])

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["method"] != "OPTIONS"
                and route_path(scope).startswith(_GUARDED_PREFIXES)):
            headers = dict(scope.get("headers") or ())
            if not self._authorized(headers.get(b"authorization", b"")):
                body = json.dumps({"error": "Unauthorized"}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 with an OpenAI error body for requests larger than `max_bytes` (Content-Length or the
    bytes actually received, whichever shows it first); 408 when the body takes longer than
    `timeout` seconds to arrive. The body is read here, at most max_bytes of it, and handed on to
    the app unchanged. (0 turns either limit off.)"""

    def __init__(self, app, max_bytes: int, timeout: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout or None

    @staticmethod
    async def _reject(send, status: int, message: str):
        body = json.dumps(error_body(message, status)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _too_slow(self, send):
        await self._reject(send, 408, f"The request body did not arrive within {self.timeout:g} s "
                                      "(--body-read-timeout).")

    async def _too_large(self, send):
        await self._reject(send, 413, f"The request body is larger than the limit of {self.max_bytes} bytes "
                                      "(--max-request-body-bytes).")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if self.max_bytes and length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(send)
        chunks, total = [], 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        return
                    chunk = message.get("body", b"")
                    total += len(chunk)
                    if self.max_bytes and total > self.max_bytes:
                        return await self._too_large(send)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await self._too_slow(send)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class HTTPMetricsMiddleware:
    """The HTTP metrics vLLM exports through prometheus-fastapi-instrumentator: per request the
    route template (`none` for paths no route knows), the method, the status class, the
    Content-Length of request and response, and the time until the last body byte was sent (a
    stream's whole length). vLLM's unmetered handlers (/metrics, /health, ...) are left out."""

    def __init__(self, app, routes, metrics: ServerMetrics):
        self.app, self.routes, self.metrics = app, routes, metrics

    def _handler(self, scope) -> tuple[str, bool]:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path, True
            if match == Match.PARTIAL and partial is None:  # e.g. a known path with a wrong method
                partial = route.path
        return (partial, True) if partial is not None else (scope["path"], False)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        handler, templated = self._handler(scope)
        if any(x in handler for x in _UNMETERED):
            return await self.app(scope, receive, send)
        handler = handler if templated else "none"
        start, end = time.perf_counter(), None
        status, response_bytes = 500, 0

        async def metered_send(message):
            nonlocal status, response_bytes, end
            if message["type"] == "http.response.start":
                status = message["status"]
                length = dict(message.get("headers") or ()).get(b"content-length", b"0")
                response_bytes = int(length) if length.isdigit() else 0
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                end = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, metered_send)
        finally:
            length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
            self.metrics.observe_http(scope["method"], status, handler, int(length) if length.isdigit() else 0,
                                      response_bytes, (end or time.perf_counter()) - start)


def settings_from_args(args, engine) -> ServerSettings:
    names = getattr(args, "served_model_name", None) or [getattr(args, "model", None) or engine.config.model.model]
    return ServerSettings(
        served_model_names=list(names), model_path=engine.config.model.model,
        max_logprobs=getattr(args, "max_logprobs", 20),
        chat_template=getattr(args, "chat_template", None),
        trust_request_chat_template=getattr(args, "trust_request_chat_template", False),
        response_role=getattr(args, "response_role", "assistant"),
        log_requests=getattr(args, "enable_log_requests", False),
        api_key=getattr(args, "api_key", None),
        return_tokens_as_token_ids=getattr(args, "return_tokens_as_token_ids", False),
        stream_write_timeout=getattr(args, "stream_write_timeout", DEFAULT_STREAM_WRITE_TIMEOUT),
        enable_auto_tool_choice=getattr(args, "enable_auto_tool_choice", False),
        tool_call_parser=getattr(args, "tool_call_parser", None),
        media=MediaConnector(allowed_local_media_path=getattr(args, "allowed_local_media_path", None),
                             allow_remote=getattr(args, "enable_remote_media", False)))


def build_app(engine, args) -> FastAPI:
    """The server app over a running AsyncLLMEngine; `args` are `herd serve`'s parsed flags (any
    object with those attributes; missing ones take their defaults)."""
    settings = settings_from_args(args, engine)
    metrics = ServerMetrics(engine, settings.served_model_names[0], engine.engine.max_model_len)
    completion = OpenAIServingCompletion(engine, settings, metrics)
    chat = OpenAIServingChat(engine, settings, metrics)
    responses = OpenAIServingResponses(engine, settings, metrics)
    base = OpenAIServing(engine, settings, metrics)
    created = int(time.time())

    app = FastAPI(title="herd OpenAI-compatible server", version=__version__)
    # --root-path: the prefix a path-based proxy serves the app under; routes answer with and
    # without it, and OpenAPI / docs links carry it (set as vLLM does, after construction)
    app.root_path = getattr(args, "root_path", None) or ""
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    install_error_handlers(app)
    # Added last = outermost: a request without the key is refused before its body is read; the
    # HTTP metrics see those refusals too, and CORS headers go on every answer, 401s included.
    max_body = getattr(args, "max_request_body_bytes", DEFAULT_MAX_REQUEST_BODY_BYTES)
    body_timeout = getattr(args, "body_read_timeout", DEFAULT_BODY_READ_TIMEOUT)
    if max_body or body_timeout:
        app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body, timeout=body_timeout)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(HTTPMetricsMiddleware, routes=app.router.routes, metrics=metrics)
    app.add_middleware(CORSMiddleware, allow_origins=getattr(args, "allowed_origins", None) or ["*"],
                       allow_credentials=getattr(args, "allow_credentials", False),
                       allow_methods=getattr(args, "allowed_methods", None) or ["*"],
                       allow_headers=getattr(args, "allowed_headers", None) or ["*"])

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.is_running else 503)

    async def ping():
        return Response(status_code=200 if engine.is_running else 503)

    app.get("/ping")(ping)  # two routes, so each gets its own OpenAPI operation id
    app.post("/ping")(ping)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        cards = [{"id": name, "object": "model", "created": created, "owned_by": "herd",
                  "root": name, "parent": None, "max_model_len": base.max_model_len,
                  "permission": [{"id": f"modelperm-{name}", "object": "model_permission",
                                  "created": created, "allow_create_engine": False,
                                  "allow_sampling": True, "allow_logprobs": True,
                                  "allow_search_indices": False, "allow_view": True,
                                  "allow_fine_tuning": False, "organization": "*", "group": None,
                                  "is_blocking": False}]}
                 for name in settings.served_model_names]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request):
        base.log_ignored_fields(request)
        request.return_tokens_as_token_ids |= settings.return_tokens_as_token_ids
        return await completion.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request):
        base.log_ignored_fields(request)
        request.return_tokens_as_token_ids |= settings.return_tokens_as_token_ids
        return await chat.create_chat_completion(request, raw_request)

    @app.post("/v1/responses")
    async def create_response(request: ResponsesRequest, raw_request: Request):
        base.log_ignored_fields(request)
        return await responses.create_response(request, raw_request)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str):
        raise OpenAIError(f"Response with id '{response_id}' not found: this server does not store responses.",
                          404, param="response_id")

    def _tokenize(request: TokenizeRequest) -> dict:  # in a worker thread
        tok = engine.tokenizer
        if request.messages is not None:
            ids = render_chat(tok, settings, request, base.check_prompt_chars)
        else:
            base.check_prompt_chars(request.prompt)
            add_special = True if request.add_special_tokens is None else request.add_special_tokens
            ids = tok.encode(request.prompt, add_special_tokens=add_special)
        strs = tok.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return {"count": len(ids), "max_model_len": base.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest):
        base.log_ignored_fields(request)
        base.model_name(request.model)
        return JSONResponse(await asyncio.to_thread(_tokenize, request))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
        base.log_ignored_fields(request)
        base.model_name(request.model)
        bad = [t for t in request.tokens if not 0 <= t < base.vocab_size]
        if bad:
            raise OpenAIError(f"Token id {bad[0]} is out of vocabulary (vocab size {base.vocab_size})",
                              param="tokens")
        return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, request.tokens)}

    @app.get("/load")
    async def load():
        return JSONResponse({"server_load": engine.num_unfinished()})

    return app
