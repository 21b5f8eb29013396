"""POST /v1/chat/completions: the checkpoint's chat template, then one engine request with n samples."""
from __future__ import annotations

import asyncio
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from herd.engine.sampling_params import SamplingParams
from herd.engine.tokenizer import apply_chat_template
from herd.multimodal import extract_chat_images
from herd.server.errors import OpenAIError, error_body, to_openai_error
from herd.server.protocol import ChatCompletionRequest
from herd.server.serving import (SSE_DONE, ChoiceCursor, OpenAIServing, UsageTracker,
                                 finish_fields, now, prompt_logprobs_json, run_until_disconnect, sse)


def render_chat(tokenizer, settings, request, check_chars=None) -> list[int]:
    """Chat messages -> prompt token ids (also used by /tokenize). CPU work: call it in a worker
    thread. `check_chars(text)` may refuse the rendered text before it is tokenized."""
    if request.chat_template is not None and not settings.trust_request_chat_template:
        raise OpenAIError("Chat template is passed with request, but --trust-request-chat-template is "
                          "not set. Refused request with untrusted chat template.", param="chat_template")
    try:
        text = apply_chat_template(
            tokenizer, request.messages, add_generation_prompt=request.add_generation_prompt,
            tools=request.tools, chat_template=request.chat_template or settings.chat_template,
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
    def _check_features(self, request: ChatCompletionRequest):
        choice = request.tool_choice
        if choice == "auto":
            raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and '
                              "--tool-call-parser to be set", param="tool_choice")
        if choice not in (None, "none"):
            raise OpenAIError(f"tool_choice {choice!r} needs structured output, which this server "
                              "does not support; use tool_choice 'none'", param="tool_choice")
        fmt = (request.response_format or {}).get("type")
        if fmt not in (None, "text"):
            raise OpenAIError(f"response_format type {fmt!r} needs structured output, which this "
                              "server does not support", param="response_format")

    def _prepare_with_images(self, request: ChatCompletionRequest):
        """Runs in a worker thread (never on the event loop): image parts are fetched and
        preprocessed, the template rendered and tokenized; the prompt's <|image|> placeholders
        expand to the image's token layout before the length checks."""
        messages, images = extract_chat_images(request.messages, self.settings.media.load_image)
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

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model = self.model_name(request.model)
        self._check_features(request)
        prep = await asyncio.to_thread(self._prepare_with_images, request)
        request_id = self.new_request_id("chatcmpl", request)
        role = self._role(request)
        if request.stream:
            return self.sse(self._stream(request, prep, request_id, model, role))
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
            choices.append({"index": o.index, "logprobs": logprobs, **finish_fields(o),
                            "message": {"role": role, "content": echo + o.text, "tool_calls": []}})
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
        try:
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
                        if not (delta or logprobs or cur.finished):
                            continue
                        yield chunk([{**choice(o.index, delta), "logprobs": logprobs, **finish_fields(o)}],
                                    with_usage=request.continuous_usage)
            if request.include_usage:
                yield chunk([], with_usage=True)
        except Exception as e:  # the 200 is already sent: report the error in the stream
            err = to_openai_error(e)
            yield sse(error_body(err.message, err.status, err.type, err.param))
        yield SSE_DONE
