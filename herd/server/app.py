"""The FastAPI app: routes of vLLM's OpenAI-compatible server over one AsyncLLMEngine."""
from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from herd import __version__
from herd.multimodal.media import MediaConnector
from herd.server.limits import DEFAULT_BODY_READ_TIMEOUT, DEFAULT_MAX_REQUEST_BODY_BYTES
from herd.server.errors import OpenAIError, error_body, install_error_handlers
from herd.server.metrics import ServerMetrics
from herd.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from herd.server.serving import DEFAULT_STREAM_WRITE_TIMEOUT, OpenAIServing, ServerSettings
from herd.server.serving_chat import OpenAIServingChat, render_chat
from herd.server.serving_completion import OpenAIServingCompletion

# Paths that need the API key: vLLM's prefixes, plus /tokenize and /detokenize, which spend
# tokenizer time on the caller's input (/health, /metrics, /version, /ping, /load stay open).
_GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/tokenize", "/detokenize")


class APIKeyMiddleware:
    """401 on guarded paths unless `Authorization: Bearer <key>` matches (constant-time compare).
    A plain ASGI middleware, so streaming responses and disconnects pass through untouched."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["method"] != "OPTIONS"
                and scope["path"].startswith(_GUARDED_PREFIXES)):
            headers = dict(scope.get("headers") or ())
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
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
        stream_write_timeout=getattr(args, "stream_write_timeout", DEFAULT_STREAM_WRITE_TIMEOUT),
        media=MediaConnector(allowed_local_media_path=getattr(args, "allowed_local_media_path", None),
                             allow_remote=getattr(args, "enable_remote_media", False)))


def build_app(engine, args) -> FastAPI:
    """The server app over a running AsyncLLMEngine; `args` are `herd serve`'s parsed flags (any
    object with those attributes; missing ones take their defaults)."""
    settings = settings_from_args(args, engine)
    metrics = ServerMetrics(engine, settings.served_model_names[0], engine.engine.max_model_len)
    completion = OpenAIServingCompletion(engine, settings, metrics)
    chat = OpenAIServingChat(engine, settings, metrics)
    base = OpenAIServing(engine, settings, metrics)
    created = int(time.time())

    app = FastAPI(title="herd OpenAI-compatible server", version=__version__)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    install_error_handlers(app)
    # Added last = outermost: a request without the key is refused before its body is read.
    max_body = getattr(args, "max_request_body_bytes", DEFAULT_MAX_REQUEST_BODY_BYTES)
    body_timeout = getattr(args, "body_read_timeout", DEFAULT_BODY_READ_TIMEOUT)
    if max_body or body_timeout:
        app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body, timeout=body_timeout)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)

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
        return await completion.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request):
        return await chat.create_chat_completion(request, raw_request)

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
        base.model_name(request.model)
        return JSONResponse(await asyncio.to_thread(_tokenize, request))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
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
