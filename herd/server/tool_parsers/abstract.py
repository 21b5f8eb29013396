"""What every tool-call parser provides, and the streaming logic they share.

A parser reads the model's reply text two ways: `extract_tool_calls(text)` once the reply is complete
(vLLM's semantics: text that is not a well-formed tool call comes back as content, never an error),
and `streaming_view(text)` for a reply still being generated: how much of it is certainly plain
content, and which tool calls in it are already complete. `ToolCallStreamer` turns successive views
into OpenAI chat-chunk deltas.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field


@dataclass
class FunctionCall:
    name: str
    arguments: str                    # JSON text, as OpenAI sends it


@dataclass
class ExtractedToolCalls:
    tools_called: bool
    tool_calls: list[FunctionCall] = field(default_factory=list)
    content: str | None = None


@dataclass
class StreamingView:
    content_end: int                  # text[:content_end] is plain content for sure
    calls: list[FunctionCall]         # tool calls complete so far, in order


def make_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_call_json(call: FunctionCall, call_id: str | None = None) -> dict:
    """A `tool_calls` entry of a chat message."""
    return {"id": call_id or make_tool_call_id(), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def arguments_json(value) -> str:
    """Arguments as OpenAI's JSON text. A model that wrote them as a JSON string of an object
    gets the object, not a doubly encoded string."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return json.dumps(parsed, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)


def call_from_object(obj) -> FunctionCall:
    """{"name": str, "arguments" | "parameters": ...} -> FunctionCall; ValueError otherwise."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("a tool call needs a string 'name'")
    if "arguments" in obj:
        args = obj["arguments"]
    elif "parameters" in obj:
        args = obj["parameters"]
    else:
        raise ValueError("a tool call needs 'arguments' or 'parameters'")
    return FunctionCall(obj["name"], arguments_json(args))


def partial_prefix_overlap(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolParser:
    """Base class. `name` is the --tool-call-parser value."""
    name = ""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def adjust_request(self, request) -> None:
        """Change the request before it runs (e.g. keep special tokens the format needs)."""

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        raise NotImplementedError

    def streaming_view(self, text: str) -> StreamingView:
        raise NotImplementedError


class ToolCallStreamer:
    """One choice's streamed reply -> (content delta, tool-call deltas), chunk by chunk. Content is
    held back while it may still turn out to be a tool call; a call is sent whole once complete; at
    the end the parser's full reading decides, so malformed calls reach the client as content."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None):
        self.parser = parser
        self.max_calls = max_calls
        self.content_sent = 0
        self.num_calls = 0

    def update(self, text: str, finished: bool) -> tuple[str, list[dict]]:
        if finished:
            info = self.parser.extract_tool_calls(text)
            if info.tools_called:
                calls, content = info.tool_calls, info.content or ""
            elif self.num_calls:  # complete calls went out already; the malformed rest is dropped
                calls, content = [], ""
            else:
                calls, content = [], text
        else:
            view = self.parser.streaming_view(text)
            calls, content = view.calls, text[:view.content_end]
        if self.max_calls is not None:
            calls = calls[:self.max_calls]
        delta = content[self.content_sent:] if len(content) > self.content_sent else ""
        self.content_sent = max(self.content_sent, len(content))
        new = []
        for call in calls[self.num_calls:]:
            new.append({"index": self.num_calls, **tool_call_json(call)})
            self.num_calls += 1
        return delta, new

    @property
    def tools_called(self) -> bool:
        return self.num_calls > 0
