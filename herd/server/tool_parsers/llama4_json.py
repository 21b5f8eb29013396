"""JSON tool calls as Llama 3.x / 4 write them (vLLM's `llama3_json` / `llama4_json`): one or more
objects `{"name": ..., "parameters": {...}}` (or "arguments"), separated by `;`, optionally after
<|python_tag|> (Llama 3) or inside <|python_start|> ... <|python_end|> (Llama 4)."""
from __future__ import annotations

import json

from herd.server.tool_parsers.abstract import (ExtractedToolCalls, StreamingView, ToolParser, call_from_object)

_MARKERS = ("<|python_tag|>", "<|python_start|>")
_DECODER = json.JSONDecoder()


class Llama4JsonToolParser(ToolParser):
    name = "llama4_json"

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """Every top-level JSON object in the reply must be a call; surrounding text is dropped
        (vLLM's reading). Anything malformed: the whole reply is content."""
        if "{" not in text:
            return ExtractedToolCalls(False, content=text)
        calls, end = [], -1
        pos = text.find("{")
        try:
            while pos != -1:
                if pos > end:
                    obj, length = _DECODER.raw_decode(text, pos)
                    calls.append(call_from_object(obj))
                    end = length - 1
                pos = text.find("{", max(pos, end) + 1)
        except ValueError:  # JSONDecodeError included
            return ExtractedToolCalls(False, content=text)
        return ExtractedToolCalls(True, calls, None)

    def streaming_view(self, text: str) -> StreamingView:
        head = text.lstrip()
        for marker in _MARKERS:
            if head.startswith(marker):
                head = head[len(marker):].lstrip()
                break
            if marker.startswith(head):  # nothing yet, or a marker still arriving
                return StreamingView(0, [])
        if not head:
            return StreamingView(0, [])
        if not head.startswith("{"):
            return StreamingView(len(text), [])
        calls, pos = [], len(text) - len(head)
        while pos < len(text):
            try:
                obj, pos = _DECODER.raw_decode(text, pos)
                calls.append(call_from_object(obj))
            except ValueError:
                break
            while pos < len(text) and (text[pos].isspace() or text[pos] in ";,"):
                pos += 1
            if text.startswith("<|python_end|>", pos):
                pos += len("<|python_end|>")
        return StreamingView(0, calls)
