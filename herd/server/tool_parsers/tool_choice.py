"""`tool_choice` "required" and named functions: the reply is constrained by structured outputs, as in
vLLM. Named: the reply is the function's arguments (its `parameters` schema). Required: a JSON array
of `{"name": one of the tools, "parameters": its schema}` with at least one item (one at most when
parallel_tool_calls is false)."""
from __future__ import annotations

import copy
import json

from herd.server.tool_parsers.abstract import (ExtractedToolCalls, StreamingView, ToolParser, call_from_object)

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}
_DECODER = json.JSONDecoder()


def tool_function(tool: dict) -> dict:
    return tool.get("function") or {}


def named_tool_schema(tools: list[dict], name: str) -> dict:
    for tool in tools:
        fn = tool_function(tool)
        if fn.get("name") == name:
            return fn.get("parameters") or dict(_EMPTY_PARAMETERS)
    raise ValueError(f"Tool '{name}' has not been passed in `tools`.")


def required_tools_schema(tools: list[dict], parallel_tool_calls: bool = True) -> dict:
    """One schema for 'any of the tools, called at least once'. Each tool's $defs move to the top
    level, where its "#/$defs/..." references point once it is nested."""
    options, defs = [], {}
    for tool in tools:
        fn = tool_function(tool)
        params = copy.deepcopy(fn.get("parameters") or _EMPTY_PARAMETERS)
        for key, schema in (params.pop("$defs", None) or {}).items():
            if key in defs and defs[key] != schema:
                raise ValueError(f"Tool definition '{key}' has multiple schemas, which is not supported.")
            defs[key] = schema
        options.append({"type": "object", "properties": {"name": {"type": "string", "enum": [fn.get("name")]},
                                                          "parameters": params},
                        "required": ["name", "parameters"], "additionalProperties": False})
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class RequiredToolCallParser(ToolParser):
    """Reads the JSON array a "required" tool choice constrains the reply to."""
    name = "required"

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        try:
            items = json.loads(text)
            if not isinstance(items, list) or not items:
                raise ValueError("not a non-empty list")
            return ExtractedToolCalls(True, [call_from_object(i) for i in items], None)
        except ValueError:  # cut off by max_tokens or a stop string: the calls completed before it
            calls = self.streaming_view(text).calls
            return ExtractedToolCalls(True, calls, None) if calls else ExtractedToolCalls(False, content=text)

    def streaming_view(self, text: str) -> StreamingView:
        pos = text.find("[")
        calls = []
        if pos != -1:
            pos += 1
            while True:
                while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
                    pos += 1
                try:
                    obj, pos = _DECODER.raw_decode(text, pos)
                    calls.append(call_from_object(obj))
                except ValueError:
                    break
        return StreamingView(0, calls)
