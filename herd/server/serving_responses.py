"""POST /v1/responses: OpenAI's Responses API (text and image input, text output) over the chat
pipeline. The input items become chat messages (`instructions` a system message first), the reply
one output message; streams carry the Responses event types. Nothing is stored: a response cannot
be fetched again or continued with `previous_response_id`."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError, model_validator

from herd.server.errors import OpenAIError, ParamError, to_openai_error
from herd.server.protocol import ChatCompletionRequest, OpenAIBaseModel
from herd.server.serving import ChoiceCursor, run_until_disconnect
from herd.server.serving_chat import OpenAIServingChat

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# Chat request fields whose errors name a Responses field instead.
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text"}
_STATUS = {"stop": "completed", "length": "incomplete", "abort": "cancelled"}


class ResponsesRequest(OpenAIBaseModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = "auto"
    parallel_tool_calls: bool | None = True
    metadata: dict[str, Any] | None = None
    user: str | None = None
    previous_response_id: str | None = None
    background: bool | None = False
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)
    stop: str | list[str] | None = None
    request_id: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.previous_response_id is not None:
            raise ParamError("previous_response_id is not supported: this server does not store responses; "
                             "send the whole conversation in `input`", "previous_response_id")
        if self.background:
            raise ParamError("background responses are not supported", "background")
        if self.tools:
            raise ParamError("tools are not supported on /v1/responses; use /v1/chat/completions", "tools")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ParamError(f"max_output_tokens must be at least 1, got {self.max_output_tokens}.",
                             "max_output_tokens")
        if isinstance(self.input, list) and not self.input:
            raise ParamError("input must not be empty", "input")
        if not isinstance((self.text or {}).get("format") or {}, dict):
            raise ParamError('text.format must be an object like {"type": "text"}', "text")
        return self

    @property
    def text_format(self) -> dict[str, Any]:
        return (self.text or {}).get("format") or {"type": "text"}


def _content(content, i: int) -> str | list[dict]:
    """A Responses message content -> chat content (input_text / input_image parts pass through)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ParamError(f"input[{i}].content must be a string or a list of content parts", "input")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise ParamError(f"input[{i}]: {kind} parts need a string `text`", "input")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            if not part.get("image_url"):
                raise ParamError(f"input[{i}]: input_image needs an image_url (file_id is not supported)", "input")
            parts.append({"type": "input_image", "image_url": part["image_url"]})
        else:
            raise ParamError(f"input[{i}]: content parts of type {kind!r} are not supported; use input_text or "
                             "input_image", "input")
    return parts


def input_messages(request: ResponsesRequest) -> list[dict]:
    messages = [{"role": "system", "content": request.instructions}] if request.instructions else []
    if isinstance(request.input, str):
        return [*messages, {"role": "user", "content": request.input}]
    for i, item in enumerate(request.input):
        kind = item.get("type", "message")
        if kind != "message":
            raise ParamError(f"input[{i}]: items of type {kind!r} are not supported (only messages)", "input")
        role = _ROLES.get(item.get("role"))
        if role is None:
            raise ParamError(f"input[{i}].role must be one of {sorted(_ROLES)}, got {item.get('role')!r}", "input")
        messages.append({"role": role, "content": _content(item.get("content"), i)})
    return messages


def _response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt.get(k) for k in ("name", "schema", "strict")}}
    if kind == "json_object":
        return {"type": "json_object"}
    raise OpenAIError(f"text.format type {kind!r} is not supported; use text, json_object or json_schema",
                      param="text")


class OpenAIServingResponses(OpenAIServingChat):
    images_in = ("The input contains an image", "input")

    def chat_request(self, request: ResponsesRequest) -> ChatCompletionRequest:
        fields = dict(messages=input_messages(request), max_completion_tokens=request.max_output_tokens,
                      temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                      min_p=request.min_p, repetition_penalty=request.repetition_penalty, seed=request.seed,
                      stop=request.stop, user=request.user)
        fmt = _response_format(request.text_format)
        if fmt is not None:
            fields["response_format"] = fmt
        try:
            return ChatCompletionRequest(**fields)
        except ValidationError as e:
            err = e.errors()[0]
            cause = (err.get("ctx") or {}).get("error")
            param = getattr(cause, "parameter", None) or next((str(x) for x in err.get("loc", ())), None)
            raise OpenAIError(str(cause) if cause is not None else err.get("msg", "invalid request"),
                              param=_PARAMS.get(param, param)) from None

    async def create_response(self, request: ResponsesRequest, raw_request: Request) -> Response:
        model = self.model_name(request.model)
        chat = self.chat_request(request)
        self._check_features(chat)
        prep = await asyncio.to_thread(self._prepare_with_images, chat)
        ids = (request.request_id or f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}")
        created = int(time.time())
        if request.stream:
            return self.sse(self._stream(request, prep, model, ids, created))
        finals = await run_until_disconnect(raw_request, self.collect([prep], ids[0]))
        if finals is None:  # the client went away
            return Response(status_code=499)
        return JSONResponse(self._body(request, prep, model, ids, created, finals[0]))

    @staticmethod
    def _message(message_id: str, text: str, status: str) -> dict:
        return {"id": message_id, "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def _body(self, request, prep, model, ids, created, out=None) -> dict:
        """The response object; `out` None: just created (in progress, no output yet)."""
        o = out.outputs[0] if out is not None else None
        status = _STATUS.get(o.finish_reason, "failed") if o is not None and o.finish_reason else "in_progress"
        output = [self._message(ids[1], o.text, status)] if o is not None else []
        usage = None
        if out is not None:
            n_in, n_out = len(out.prompt_token_ids), len(o.token_ids)
            usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": out.num_cached_tokens or 0},
                     "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": n_in + n_out}
        p = prep.params
        return {"id": ids[0], "object": "response", "created_at": created, "status": status, "model": model,
                "output": output, "output_text": o.text if o is not None else "", "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
                "temperature": p.temperature, "top_p": p.top_p, "parallel_tool_calls": request.parallel_tool_calls,
                "tool_choice": request.tool_choice, "tools": [], "text": {"format": request.text_format},
                "previous_response_id": None, "store": False, "background": False, "truncation": "disabled",
                "reasoning": None, "metadata": request.metadata, "user": request.user, "usage": usage}

    async def _stream(self, request, prep, model, ids, created):
        seq = itertools.count()
        where = {"item_id": ids[1], "output_index": 0, "content_index": 0}

        def event(kind: str, **body) -> str:
            data = json.dumps({"type": kind, **body, "sequence_number": next(seq)}, ensure_ascii=False)
            return f"event: {kind}\ndata: {data}\n\n"

        started = self._body(request, prep, model, ids, created)
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        item = {**self._message(ids[1], "", "in_progress"), "content": []}
        yield event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.content_part.added", **where, part=part)
        cursor, out = ChoiceCursor(), None
        try:
            async with aclosing(self.merged([prep], ids[0])) as stream:
                async for _, out in stream:
                    delta, _, _ = cursor.advance(out.outputs[0], prep.params)
                    if delta:
                        yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
        except Exception as e:  # the 200 is already sent: report the error in the stream
            err = to_openai_error(e)
            yield event("error", code=err.type, message=err.message, param=err.param)
            return
        final = self._body(request, prep, model, ids, created, out)
        text = final["output_text"]
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part={**part, "text": text})
        yield event("response.output_item.done", output_index=0, item=final["output"][0])
        yield event("response.completed", response=final)
