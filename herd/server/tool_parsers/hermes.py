"""Hermes / Qwen tool calls (vLLM's `hermes`): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks, after optional plain content."""
from __future__ import annotations

import json
import re

from herd.server.tool_parsers.abstract import (ExtractedToolCalls, StreamingView, ToolParser, call_from_object,
                                               partial_prefix_overlap)

START, END = "<tool_call>", "</tool_call>"
# A closed block, or an unclosed one running to the end of the reply.
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


class HermesToolParser(ToolParser):
    name = "hermes"

    def adjust_request(self, request) -> None:
        # The tags may be special tokens: skipping them would hide the calls from the parser.
        if request.tools and request.tool_choice != "none":
            request.skip_special_tokens = False

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        if START not in text:
            return ExtractedToolCalls(False, content=text)
        try:
            calls = [call_from_object(json.loads(closed or open_)) for closed, open_ in _BLOCK.findall(text)]
        except ValueError:
            return ExtractedToolCalls(False, content=text)
        content = text[:text.find(START)]
        return ExtractedToolCalls(True, calls, content or None)

    def streaming_view(self, text: str) -> StreamingView:
        first = text.find(START)
        if first == -1:
            return StreamingView(len(text) - partial_prefix_overlap(text, START), [])
        calls, pos = [], first
        while True:
            start = text.find(START, pos)
            if start == -1:
                break
            end = text.find(END, start)
            if end == -1:
                break
            try:
                calls.append(call_from_object(json.loads(text[start + len(START):end])))
            except ValueError:
                break
            pos = end + len(END)
        return StreamingView(first, calls)
