"""OpenAI/vLLM error bodies: {"error": {"message", "type", "param", "code"}}, HTTP status == code.

Every failure a client can cause maps to a 4xx here; FastAPI's 422 for validation becomes 400.
"""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from herd.engine.async_engine import EngineDeadError, EngineStepError
from herd.engine.sampling_params import SamplingParamsError

logger = logging.getLogger(__name__)

# `type` strings as vLLM writes them for each status.
_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
          501: "NotImplementedError"}


class OpenAIError(Exception):
    """A request failure with the status, type and param of the OpenAI error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.type = type or _TYPES.get(status) or HTTPStatus(status).phrase


class ParamError(ValueError):
    """Raised inside pydantic validators; `parameter` becomes the error body's `param`."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


def error_body(message: str, status: int, type: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or _TYPES.get(status, HTTPStatus(status).phrase),
                      "param": param, "code": status}}


def to_openai_error(exc: BaseException) -> OpenAIError:
    """Map an exception raised while serving a request onto its OpenAI error."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, (EngineDeadError, EngineStepError)):
        return OpenAIError(str(exc), 500)
    if isinstance(exc, (SamplingParamsError, ParamError)):
        return OpenAIError(str(exc), 400, param=exc.parameter)
    if isinstance(exc, ValueError):
        return OpenAIError(str(exc), 400)
    if isinstance(exc, NotImplementedError):
        return OpenAIError(str(exc) or "not implemented", 501)
    logger.exception("request failed", exc_info=exc)
    return OpenAIError(f"internal error: {type(exc).__name__}: {exc}", 500)


def error_response(exc: BaseException) -> JSONResponse:
    err = to_openai_error(exc)
    return JSONResponse(error_body(err.message, err.status, err.type, err.param), status_code=err.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in exc.errors():
        ctx_error = (e.get("ctx") or {}).get("error")
        if e.get("type") == "json_invalid":  # loc holds a character position, not a field
            parts.append(f"JSON decode error: {ctx_error} at character {e['loc'][-1]}")
            continue
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if param is None:
            param = getattr(ctx_error, "parameter", None) or (loc[0] if loc else None)
        msg = str(ctx_error) if isinstance(ctx_error, ParamError) else e.get("msg", "invalid value")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, 400, HTTPStatus.BAD_REQUEST.phrase, param), status_code=400)

    # Expected failures are handled per class: Starlette sends a catch-all (Exception) handler's
    # response and then re-raises, which drops the keep-alive connection.
    async def _expected(_: Request, exc: Exception):
        return error_response(exc)

    for klass in (OpenAIError, ValueError, NotImplementedError, EngineDeadError, EngineStepError):
        app.add_exception_handler(klass, _expected)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        # unknown paths (404), wrong methods (405), unparsable bodies (400): the same error body
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return JSONResponse(error_body(message, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        return error_response(exc)
