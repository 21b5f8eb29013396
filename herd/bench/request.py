"""One streamed request to an OpenAI-compatible server, timed chunk by chunk."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestInput:
    prompt: str | list[int]
    prompt_len: int
    output_len: int
    model: str
    endpoint: str                     # /v1/completions or /v1/chat/completions
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict | None = None


@dataclass
class RequestOutput:
    success: bool = False
    generated_text: str = ""
    prompt_len: int = 0               # from the server's usage when it reports one
    output_tokens: int = 0            # from usage, else the number of streamed chunks with text
    ttft: float = 0.0                 # seconds from send to the first chunk with text
    itl: list[float] = field(default_factory=list)   # gaps between chunks with text
    latency: float = 0.0              # seconds from send to the end of the stream
    start_time: float = 0.0           # perf_counter() at send
    chunk_times: list[float] = field(default_factory=list)  # perf_counter() of each chunk with text
    error: str = ""


def build_payload(inp: RequestInput) -> dict:
    body: dict = {"model": inp.model, "temperature": inp.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if inp.endpoint.endswith("chat/completions"):
        if not isinstance(inp.prompt, str):
            raise ValueError("the chat endpoint needs text prompts")
        body["messages"] = [{"role": "user", "content": inp.prompt}]
        body["max_completion_tokens"] = inp.output_len
    else:
        body["prompt"] = inp.prompt
        body["max_tokens"] = inp.output_len
    if inp.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension, which herd shares
    body.update(inp.extra_body or {})
    return body


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "text" in c:
        return c.get("text") or ""
    delta = c.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


async def send_request(client: httpx.AsyncClient, inp: RequestInput, pbar=None) -> RequestOutput:
    out = RequestOutput(prompt_len=inp.prompt_len)
    start = time.perf_counter()
    out.start_time = start
    last = start
    chunks_with_text = 0
    usage = None
    try:
        async with client.stream("POST", inp.endpoint, json=build_payload(inp)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {body[:300]}")
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line or not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"server error in stream: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                text = _chunk_text(chunk)
                if not text:
                    continue
                now = time.perf_counter()
                if chunks_with_text == 0:
                    out.ttft = now - start
                else:
                    out.itl.append(now - last)
                last = now
                chunks_with_text += 1
                out.chunk_times.append(now)
                out.generated_text += text
        out.latency = time.perf_counter() - start
        if usage:
            out.output_tokens = int(usage.get("completion_tokens") or 0)
            out.prompt_len = int(usage.get("prompt_tokens") or inp.prompt_len)
        else:
            out.output_tokens = chunks_with_text
        out.success = chunks_with_text > 0
        if not out.success:
            out.error = "the stream carried no text"
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"
        out.latency = time.perf_counter() - start
    if pbar is not None:
        pbar.update(1)
    return out
