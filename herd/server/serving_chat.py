"""POST /v1/chat/completions: the checkpoint's chat template, then one engine request with n samples.

Tool calls: with tool_choice "auto" (needs --enable-auto-tool-choice and --tool-call-parser) the reply
is read by the tool-call parser; "required" and named functions constrain the reply with a JSON
schema (herd.server.tool_parsers.tool_choice), so their calls always parse.
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from herd.engine.sampling_params import SamplingParams
from herd.engine.tokenizer import apply_chat_template
from herd.multimodal import extract_chat_images
from herd.multimodal.chat import builtin_chat_template, prepare_tool_messages
from herd.server.errors import OpenAIError
from herd.server.protocol import ChatCompletionRequest
from herd.server.serving import (ChoiceCursor, OpenAIServing, UsageTracker, finish_fields, now,
                                 openai_stream, prompt_logprobs_json, run_until_disconnect, sse)
from herd.server.tool_parsers import (ExtractedToolCalls, FunctionCall, ToolCallStreamer, ToolParser,
                                      get_tool_parser, make_tool_call_id, tool_call_json)
from herd.server.tool_parsers.tool_choice import RequiredToolCallParser


def render_chat(tokenizer, settings, request, check_chars=None) -> list[int]:
    """Chat messages -> prompt token ids (also used by /tokenize). CPU work: call it in a worker
    thread. `check_chars(text)` may refuse the rendered text before it is tokenized."""
    if request.chat_template is not None and not settings.trust_request_chat_template:
        raise OpenAIError("Chat template is passed with request, but --trust-request-chat-template is "
                          "not set. Refused request with untrusted chat template.", param="chat_template")
    # a request may name a shipped template, never a file
    template = (builtin_chat_template(request.chat_template) or request.chat_template) if request.chat_template \
        else settings.chat_template
    try:
        text = apply_chat_template(
            tokenizer, prepare_tool_messages(request.messages), add_generation_prompt=request.add_generation_prompt,
            tools=request.tools, chat_template=template,
            continue_final_message=request.continue_final_message, tokenize=False,
            **(request.chat_template_kwargs or {}))
    except ValueError:
        raise
    except TypeError as e:  # e.g. chat_template_kwargs naming an argument twice
        raise OpenAIError(f"bad chat template arguments: {e}", param="chat_template_kwargs") from e
    except Exception as e:  # jinja2 errors from a template that does not fit these messages
        raise OpenAIError(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                          param="messages") from e
    if check_chars is not None:
        check_chars(text)
    add_special = request.add_special_tokens if request.add_special_tokens is not None else False
    return tokenizer.encode(text, add_special_tokens=add_special)


class OpenAIServingChat(OpenAIServing):
    # what holds a request's images, for the errors that refuse them
    images_in = ("The messages contain an image", "messages")

    def __init__(self, engine, settings, metrics):
        super().__init__(engine, settings, metrics)
        name = settings.tool_call_parser
        self.tool_parser_cls: type[ToolParser] | None = get_tool_parser(name) if name else None

    def _check_features(self, request: ChatCompletionRequest):
        if request.tool_choice_mode == "auto" and not (self.settings.enable_auto_tool_choice and self.tool_parser_cls):
            raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and '
                              "--tool-call-parser to be set", param="tool_choice")

    def _tool_parser(self, request: ChatCompletionRequest) -> ToolParser | None:
        """The reader of this request's replies: the configured parser for "auto", the JSON array
        reader for "required"; none otherwise (named choices need no parsing)."""
        mode = request.tool_choice_mode
        if mode == "auto":
            return self.tool_parser_cls(self.tokenizer)
        if mode == "required":
            return RequiredToolCallParser(self.tokenizer)
        return None

    def _prepare_with_images(self, request: ChatCompletionRequest):
        """Runs in a worker thread (never on the event loop): image parts are counted (a text model
        or too many images: refused before any fetch), fetched and preprocessed, the template
        rendered and tokenized; the prompt's <|image|> placeholders expand to the image's token
        layout before the length checks."""
        where, param = self.images_in
        messages, images = extract_chat_images(request.messages, self.settings.media.load_image,
                                               check=lambda n: self.check_image_count(n, where, param))
        if not images:
            return self.prepare(render_chat(self.tokenizer, self.settings, request, self.check_prompt_chars),
                                request)
        ids = render_chat(self.tokenizer, self.settings, request.model_copy(update={"messages": messages}),
                          self.check_prompt_chars)
        text, ids, mm = self.llm.process_prompt(
            {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, SamplingParams())
        prep = self.prepare(ids, request, text)
        prep.mm = mm
        return prep

    def _role(self, request: ChatCompletionRequest) -> str:
        if request.add_generation_prompt:
            return self.settings.response_role
        return request.messages[-1]["role"]

    @staticmethod
    def _echo_text(request: ChatCompletionRequest, role: str) -> str:
        """With echo, the reply starts with the last message when it has the reply's role."""
        last = request.messages[-1]
        if not request.echo or last.get("role") != role:
            return ""
        content = last.get("content")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return content if isinstance(content, str) else ""

    @staticmethod
    def _finish_reason(request: ChatCompletionRequest, finish_reason: str | None, tools_called: bool) -> str | None:
        """OpenAI's: "tool_calls" when "auto" called a tool or "required" ended normally; a named
        tool choice keeps "stop"."""
        mode = request.tool_choice_mode
        if tools_called and (mode == "auto" or (mode == "required" and finish_reason == "stop")):
            return "tool_calls"
        return finish_reason

    def _message(self, request: ChatCompletionRequest, parser: ToolParser | None, text: str,
                 finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
        """(content, tool_calls, finish_reason) of one finished choice."""
        mode = request.tool_choice_mode
        if mode == "named":
            call = FunctionCall(request.named_tool, text)
            return "", [tool_call_json(call)], finish_reason
        if parser is None:
            return text, [], finish_reason
        info: ExtractedToolCalls = parser.extract_tool_calls(text)
        if not info.tools_called:
            return text, [], finish_reason
        calls = info.tool_calls if request.parallel_tool_calls is not False else info.tool_calls[:1]
        content = "" if mode == "required" else info.content
        return content, [tool_call_json(c) for c in calls], self._finish_reason(request, finish_reason, True)

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model = self.model_name(request.model)
        self._check_features(request)
        parser = self._tool_parser(request)
        if parser is not None:
            parser.adjust_request(request)
        prep = await asyncio.to_thread(self._prepare_with_images, request)
        request_id = self.new_request_id("chatcmpl", request)
        role = self._role(request)
        if request.stream:
            return self.sse(openai_stream(self._stream(request, prep, request_id, model, role)))
        finals = await run_until_disconnect(raw_request, self.collect([prep], request_id))
        if finals is None:  # the client went away
            return Response(status_code=499)
        out = finals[0]
        echo = self._echo_text(request, role)
        choices = []
        for o in out.outputs:
            logprobs = None
            if request.logprobs:
                logprobs = self.chat_logprobs(o.token_ids, o.logprobs or [], request.top_logprobs or 0,
                                              request.return_tokens_as_token_ids)
            content, tool_calls, reason = self._message(request, parser, o.text, o.finish_reason)
            if echo:
                content = echo + (content or "")
            choices.append({"index": o.index, "logprobs": logprobs, **finish_fields(o), "finish_reason": reason,
                            "message": {"role": role, "content": content, "tool_calls": tool_calls}})
        usage = UsageTracker()
        usage.update(0, out)
        body = {"id": request_id, "object": "chat.completion", "created": now(), "model": model,
                "choices": choices, "usage": usage.as_dict(), "system_fingerprint": None}
        if request.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
        return JSONResponse(body)

    async def _stream(self, request: ChatCompletionRequest, prep, request_id, model, role):
        created = now()
        usage = UsageTracker()
        usage.prompt_tokens[0] = len(prep.token_ids)

        def chunk(choices, with_usage=False):
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": choices}
            if with_usage:
                body["usage"] = usage.as_dict()
            return sse(body)

        def choice(i, content, **extra):
            return {"index": i, "delta": {"content": content, **extra}, "logprobs": None,
                    "finish_reason": None}

        n = prep.params.n
        for i in range(n):
            yield chunk([choice(i, "", role=role)], with_usage=request.continuous_usage)
        echo = self._echo_text(request, role)
        if echo:
            for i in range(n):
                yield chunk([choice(i, echo)], with_usage=request.continuous_usage)
        cursors = [ChoiceCursor() for _ in range(n)]
        mode = request.tool_choice_mode
        max_calls = None if request.parallel_tool_calls is not False else 1
        streamers = [ToolCallStreamer(p, max_calls) if (p := self._tool_parser(request)) else None for _ in range(n)]
        named = [(make_tool_call_id(), request.named_tool) for _ in range(n)] if mode == "named" else None
        async with aclosing(self.merged([prep], request_id)) as stream:
            async for _, out in stream:
                usage.update(0, out)
                for o in out.outputs:
                    cur = cursors[o.index]
                    if cur.finished:  # n > 1: this sample ended in an earlier output
                        continue
                    delta, t0, t1 = cur.advance(o, prep.params)
                    logprobs = None
                    if request.logprobs and t1 > t0:
                        logprobs = self.chat_logprobs(o.token_ids[t0:t1], (o.logprobs or [])[t0:t1],
                                                      request.top_logprobs or 0,
                                                      request.return_tokens_as_token_ids)
                    message, tools_called = self._stream_delta(o, cur, delta, streamers[o.index],
                                                               named[o.index] if named else None)
                    if not (message or logprobs or cur.finished):
                        continue
                    reason = self._finish_reason(request, o.finish_reason, tools_called) if cur.finished else None
                    yield chunk([{"index": o.index, "delta": message or {"content": ""}, "logprobs": logprobs,
                                  **finish_fields(o), "finish_reason": reason}],
                                with_usage=request.continuous_usage)
        if request.include_usage:
            yield chunk([], with_usage=True)

    @staticmethod
    def _stream_delta(o, cur: ChoiceCursor, delta: str, streamer: ToolCallStreamer | None,
                      named: tuple[str, str] | None) -> tuple[dict, bool]:
        """The delta of one choice's chunk, and whether it has called tools so far."""
        if named is not None:  # the reply is the named function's arguments, streamed as they come
            if not delta and cur.started:
                return {}, True
            call = {"index": 0, "function": {"arguments": delta}}
            if not cur.started:
                cur.started = True
                call_id, name = named
                call = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": delta}}
            return {"tool_calls": [call]}, True
        if streamer is None:
            return ({"content": delta} if delta else {}), False
        content, calls = streamer.update(o.text[:cur.text_sent], cur.finished)
        message = {}
        if content:
            message["content"] = content
        if calls:
            message["tool_calls"] = calls
        return message, streamer.tools_called
