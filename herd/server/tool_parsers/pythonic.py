"""Pythonic tool calls: the reply is a Python list of calls with keyword arguments,
`[get_weather(city="Paris", unit="celsius"), get_time(zone="CET")]` (vLLM's `pythonic`), and Llama 4's
variant that may wrap it in <|python_start|> ... <|python_end|> (`llama4_pythonic`)."""
from __future__ import annotations

import ast
import json
import warnings

from herd.server.tool_parsers.abstract import ExtractedToolCalls, FunctionCall, StreamingView, ToolParser

# JSON spellings some models write inside Python calls.
_NAME_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class _NotToolCall(ValueError):
    pass


def _value(node: ast.AST):
    """A literal argument value -> its JSON value."""
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (str, int, float, bool)):
            return node.value
        raise _NotToolCall(f"unsupported constant {node.value!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand)
        if isinstance(inner, bool) or not isinstance(inner, (int, float)):
            raise _NotToolCall("sign on a non-number")
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Name) and node.id in _NAME_LITERALS:
        return _NAME_LITERALS[node.id]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _NotToolCall("** in a dict argument")
        keys = [_value(k) for k in node.keys]
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in keys):
            raise _NotToolCall("dict keys must be literals")
        return {k if isinstance(k, str) else json.dumps(k): _value(v) for k, v in zip(keys, node.values)}
    raise _NotToolCall(f"unsupported argument {type(node).__name__}")


def _call(node: ast.AST) -> FunctionCall:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise _NotToolCall("each list item must be a call of a plain function name")
    if node.args or any(k.arg is None for k in node.keywords):
        raise _NotToolCall("tool call arguments must be given by keyword")
    args = {k.arg: _value(k.value) for k in node.keywords}
    return FunctionCall(node.func.id, json.dumps(args, ensure_ascii=False))


def parse_call_list(text: str) -> list[FunctionCall]:
    """`[f(a=1), g(b="x")]` -> its calls; _NotToolCall (a ValueError) for anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in model text
            tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _NotToolCall(str(e)) from None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        raise _NotToolCall("a tool call reply is a non-empty list of calls")
    return [_call(e) for e in tree.body.elts]


def _complete_call_ends(text: str, start: int) -> list[int]:
    """Indexes just past each top-level call that is closed, in `text[start:]` (a list opened at
    `start`). Python string literals (' or ", with escapes) are skipped."""
    ends, depth, quote, i, n = [], 0, None, start, len(text)
    while i < n:
        c = text[i]
        if quote is not None:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if c == ")" and depth == 1:
                ends.append(i + 1)
            if depth <= 0:
                break
        i += 1
    return ends


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def _strip(self, text: str) -> str:
        return text

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        body = self._strip(text)
        stripped = body.strip()
        if not (stripped.startswith("[") and stripped.endswith("]")):
            return ExtractedToolCalls(False, content=body)
        try:
            return ExtractedToolCalls(True, parse_call_list(stripped), None)
        except _NotToolCall:
            return ExtractedToolCalls(False, content=body)

    def streaming_view(self, text: str) -> StreamingView:
        body = self._strip(text)
        stripped = body.lstrip()
        if not stripped:
            return StreamingView(0, [])
        if not stripped.startswith("["):
            return StreamingView(len(text), [])
        start = len(body) - len(stripped)
        ends = _complete_call_ends(body, start)
        if not ends:
            return StreamingView(0, [])
        try:
            calls = parse_call_list(body[start:ends[-1]] + "]")
        except _NotToolCall:
            calls = []
        return StreamingView(0, calls)


class Llama4PythonicToolParser(PythonicToolParser):
    """Llama 4 may put the list between <|python_start|> and <|python_end|> (visible when special
    tokens are not skipped)."""
    name = "llama4_pythonic"
    START, END = "<|python_start|>", "<|python_end|>"

    def _strip(self, text: str) -> str:
        head = text.lstrip()
        if head.startswith(self.START):
            return head[len(self.START):].replace(self.END, "")
        return text

    def streaming_view(self, text: str) -> StreamingView:
        head = text.lstrip()
        if head and self.START.startswith(head):  # the marker itself may still be arriving
            return StreamingView(0, [])
        return super().streaming_view(text)
