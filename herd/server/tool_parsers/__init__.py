"""Tool-call parsers for `--tool-call-parser` (vLLM's names and semantics): the model's reply text ->
OpenAI `tool_calls`. `required` / named tool choices are constrained by structured outputs instead
(herd.server.tool_parsers.tool_choice)."""
from __future__ import annotations

from herd.server.tool_parsers.abstract import (ExtractedToolCalls, FunctionCall, StreamingView, ToolCallStreamer,
                                               ToolParser, make_tool_call_id, tool_call_json)
from herd.server.tool_parsers.hermes import HermesToolParser
from herd.server.tool_parsers.llama4_json import Llama4JsonToolParser
from herd.server.tool_parsers.pythonic import Llama4PythonicToolParser, PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "llama4_pythonic": Llama4PythonicToolParser,
    "llama4_json": Llama4JsonToolParser,
    "llama3_json": Llama4JsonToolParser,  # vLLM registers one parser under both names
    "pythonic": PythonicToolParser,
    "hermes": HermesToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"invalid tool call parser: {name!r} (choose from {', '.join(sorted(TOOL_PARSERS))})") \
            from None


__all__ = ["ExtractedToolCalls", "FunctionCall", "HermesToolParser", "Llama4JsonToolParser",
           "Llama4PythonicToolParser", "PythonicToolParser", "StreamingView", "TOOL_PARSERS", "ToolCallStreamer",
           "ToolParser", "get_tool_parser", "make_tool_call_id", "tool_call_json"]
