"""Tool calling: parser unit tests (Llama 4 pythonic and JSON formats, hermes, malformed output),
Llama 4 tool templates, and the official openai client against a real `herd serve` with
--enable-auto-tool-choice --tool-call-parser llama4_pythonic."""
from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest

from herd.hub.default import default_model_path
from herd.server.tool_parsers import (HermesToolParser, Llama4JsonToolParser, Llama4PythonicToolParser,
                                      PythonicToolParser, ToolCallStreamer, get_tool_parser)
from herd.server.tool_parsers.tool_choice import RequiredToolCallParser, named_tool_schema, required_tools_schema
from tests.server_utils import RemoteServer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
CLOCK = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["CET", "UTC"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for the next three days?"}]


def _calls(info):
    return [(c.name, json.loads(c.arguments)) for c in info.tool_calls]


def _stream_all(parser, text, step=1):
    """Feed text to a ToolCallStreamer in slices; return (content, calls)."""
    s = ToolCallStreamer(parser)
    content, calls = "", []
    for end in range(step, len(text) + step, step):
        delta, new = s.update(text[:end], end >= len(text))
        content += delta
        calls += new
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls], calls


# -- parsers -----------------------------------------------------------------------------------

def test_llama4_pythonic_parser():
    p = Llama4PythonicToolParser()
    text = '[get_weather(city="Paris", days=3), get_time(zone=\'CET\', extra={"a": [1, -2.5, true, null]})]'
    info = p.extract_tool_calls(text)
    assert info.tools_called and info.content is None
    assert _calls(info) == [("get_weather", {"city": "Paris", "days": 3}),
                            ("get_time", {"zone": "CET", "extra": {"a": [1, -2.5, True, None]}})]
    # Llama 4 may wrap the list in its python markers (kept when special tokens are not skipped)
    info = p.extract_tool_calls('<|python_start|>[get_time(zone="UTC")]<|python_end|>')
    assert _calls(info) == [("get_time", {"zone": "UTC"})]
    # streaming: calls come out whole as soon as they close, a ")" inside a string does not end one
    content, calls, raw = _stream_all(p, '[get_weather(city="Pa)ris", days=1), get_time(zone="UTC")]')
    assert content == "" and calls == [("get_weather", {"city": "Pa)ris", "days": 1}), ("get_time", {"zone": "UTC"})]
    assert [c["index"] for c in raw] == [0, 1] and all(c["id"].startswith("chatcmpl-tool-") for c in raw)
    # the plain `pythonic` parser reads the same list but not the markers
    assert _calls(PythonicToolParser().extract_tool_calls('[f(x=1)]')) == [("f", {"x": 1})]
    assert not PythonicToolParser().extract_tool_calls('<|python_start|>[f(x=1)]').tools_called


@pytest.mark.parametrize("text", [
    '[get_weather(city="Paris"',            # cut off
    '[get_weather("Paris")]',               # positional argument
    '[get_weather(city=paris)]',            # a variable, not a literal
    '[os.system(cmd="ls")]',                # not a plain function name
    '[1, 2, 3]', '[]', 'Sure! [get_time(zone="CET")]', 'It is sunny.', '', '[' * 500 + ']' * 500,
])
def test_pythonic_malformed_is_content(text):
    p = Llama4PythonicToolParser()
    info = p.extract_tool_calls(text)
    assert not info.tools_called and info.tool_calls == [] and info.content == text
    content, calls, _ = _stream_all(p, text, step=3)
    assert calls == [] and content == text


def test_pythonic_trailing_text():
    p = Llama4PythonicToolParser()
    text = '[get_time(zone="CET")] and more'
    assert p.extract_tool_calls(text).content == text  # not a call list as a whole
    # streamed, the call went out when it closed; the rest is not sent again as content
    content, calls, _ = _stream_all(p, text)
    assert calls == [("get_time", {"zone": "CET"})] and content == ""


def test_llama4_json_parser():
    p = Llama4JsonToolParser()
    text = '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}; {"name": "get_time", "arguments": {"zone": "UTC"}}'
    assert _calls(p.extract_tool_calls(text)) == [("get_weather", {"city": "Oslo", "days": 2}),
                                                  ("get_time", {"zone": "UTC"})]
    # markers, and arguments a model wrote as a JSON string
    info = p.extract_tool_calls('<|python_start|>{"name": "get_time", "parameters": "{\\"zone\\": \\"CET\\"}"}<|python_end|>')
    assert info.tools_called and info.content is None and _calls(info) == [("get_time", {"zone": "CET"})]
    content, calls, _ = _stream_all(p, text, step=2)
    assert content == "" and [name for name, _ in calls] == ["get_weather", "get_time"]
    content, calls, _ = _stream_all(p, "No tool needed: it is 5 o'clock.", step=4)
    assert calls == [] and content == "No tool needed: it is 5 o'clock."
    assert get_tool_parser("llama3_json") is Llama4JsonToolParser


@pytest.mark.parametrize("text", ['{"name": "get_time", "parameters": {"zone": "CET"}',  # cut off
                                  '{"zone": "CET"}',                                     # no name
                                  '{"name": "f"}',                                       # no arguments
                                  'The set {1, 2} is small', '{"name": 3, "parameters": {}}'])
def test_llama4_json_malformed_is_content(text):
    p = Llama4JsonToolParser()
    info = p.extract_tool_calls(text)
    assert not info.tools_called and info.content == text
    content, calls, _ = _stream_all(p, text, step=5)
    assert calls == [] and content == text


def test_hermes_parser():
    p = HermesToolParser()
    text = 'Let me look.<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    info = p.extract_tool_calls(text)
    assert info.content == "Let me look." and _calls(info) == [("get_time", {"zone": "UTC"})]
    content, calls, _ = _stream_all(p, text)
    assert content == "Let me look." and calls == [("get_time", {"zone": "UTC"})]  # "<tool_c..." never leaks
    bad = 'Let me look.<tool_call>{"name": "get_time", "arguments": {"zone": '
    assert p.extract_tool_calls(bad).content == bad and not p.extract_tool_calls(bad).tools_called
    request = SimpleNamespace(tools=TOOLS, tool_choice="auto", skip_special_tokens=True)
    p.adjust_request(request)
    assert request.skip_special_tokens is False  # the tags may be special tokens
    with pytest.raises(ValueError, match="invalid tool call parser"):
        get_tool_parser("no_such_parser")


def test_tool_choice_schemas():
    assert named_tool_schema(TOOLS, "get_time") == CLOCK
    with pytest.raises(ValueError, match="has not been passed"):
        named_tool_schema(TOOLS, "nope")
    schema = required_tools_schema(TOOLS, parallel_tool_calls=False)
    good = [{"name": "get_weather", "parameters": {"city": "Rome", "days": 2}}]
    jsonschema.validate(good, schema)
    for bad in ([], good * 2, [{"name": "get_time", "parameters": {"city": "Rome", "days": 2}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    r = RequiredToolCallParser()
    # cut off by max_tokens: the calls completed before the cut still count
    info = r.extract_tool_calls('[{"name": "get_time", "parameters": {"zone": "CET"}}, {"name": "get_ti')
    assert _calls(info) == [("get_time", {"zone": "CET"})]
    assert not r.extract_tool_calls('[{"name": "get_ti').tools_called


# -- templates ---------------------------------------------------------------------------------

def _conversation():
    return [{"role": "system", "content": "Be brief."}, *MESSAGES,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call-1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
            {"role": "tool", "tool_call_id": "call-1", "content": '{"forecast": "sunny"}'}]


def test_llama4_templates_render_tool_turns():
    from transformers.models.llama4.processing_llama4 import chat_template as meta_template

    from herd.engine.tokenizer import apply_chat_template, get_tokenizer
    from herd.multimodal.chat import prepare_tool_messages, resolve_chat_template

    tok = get_tokenizer(default_model_path())
    msgs = prepare_tool_messages(_conversation())
    text = apply_chat_template(tok, msgs, tools=TOOLS, chat_template=resolve_chat_template("llama4_pythonic"),
                               tokenize=False)
    assert '"name": "get_weather"' in text.split("<|eot|>")[0]  # the tools are in the system turn
    assert '<|header_start|>assistant<|header_end|>\n\n[get_weather(city="Paris", days=3)]<|eot|>' in text
    assert '<|header_start|>ipython<|header_end|>\n\n{"forecast": "sunny"}<|eot|>' in text
    assert text.endswith("<|header_start|>assistant<|header_end|>\n\n")
    # the earlier call, rendered by the template, parses back with the matching parser
    rendered = text.split("<|header_start|>assistant<|header_end|>\n\n")[1].split("<|eot|>")[0]
    assert _calls(Llama4PythonicToolParser().extract_tool_calls(rendered)) == [("get_weather", {"city": "Paris", "days": 3})]
    text = apply_chat_template(tok, msgs, tools=TOOLS, chat_template=resolve_chat_template("llama4_json"), tokenize=False)
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}<|eot|>' in text
    # Llama 4's own (Meta's) template renders the same turns
    text = apply_chat_template(tok, msgs, tools=TOOLS, chat_template=meta_template, tokenize=False)
    assert '"parameters": {"city": "Paris", "days": 3}' in text and "<|header_start|>ipython<|header_end|>" in text


def test_llm_chat_with_tools_offline():
    from herd import LLM, SamplingParams

    llm = LLM(default_model_path(), dtype="float32", max_model_len=1024, num_kv_blocks=80, block_size=16, device="cpu")
    out = llm.chat(_conversation(), SamplingParams(temperature=0, max_tokens=4), tools=TOOLS,
                   chat_template="llama4_pythonic", use_tqdm=False)[0]
    prompt = llm.get_tokenizer().decode(out.prompt_token_ids, skip_special_tokens=False)
    assert '[get_weather(city="Paris", days=3)]' in prompt and '{"forecast": "sunny"}' in prompt
    # the embedded model's own template has no tool syntax, but a tool-calling turn still renders
    out = llm.chat(_conversation(), SamplingParams(temperature=0, max_tokens=4), tools=TOOLS, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


# -- a real server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    srv = RemoteServer(default_model_path(), [
        "--dtype", "float32", "--block-size", "16", "--num-kv-blocks", "128", "--max-model-len", "1024",
        "--served-model-name", "m", "--device", "cpu", "--disable-log-stats", "--disable-uvicorn-access-log",
        "--enable-auto-tool-choice", "--tool-call-parser", "llama4_pythonic", "--chat-template", "llama4_pythonic"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _check_call(name, arguments):
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _collect_stream(stream):
    """Accumulate streamed tool-call deltas by index, as OpenAI clients do."""
    calls, content, finish, first = {}, "", None, {}
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        for d in c.delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            first.setdefault(d.index, d)
            entry["id"] = entry["id"] or d.id
            entry["name"] += (d.function.name or "") if d.function else ""
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, first


def test_named_tool_choice(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                       max_completion_tokens=64, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.content == ""
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    _check_call(call.function.name, call.function.arguments)

    stream = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                            max_completion_tokens=64, temperature=0, stream=True)
    content, calls, finish, first = _collect_stream(stream)
    assert finish == "stop" and content == "" and len(calls) == 1
    assert first[0].id and first[0].type == "function" and first[0].function.name == "get_weather"
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == call.function.arguments  # greedy: same
    _check_call("get_weather", calls[0]["arguments"])


def test_required_tool_choice(client):
    kw = dict(model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              max_completion_tokens=96, temperature=0.8, seed=7)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    _check_call(call.function.name, call.function.arguments)
    content, calls, finish, _ = _collect_stream(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == \
        [(call.function.name, json.loads(call.function.arguments))]  # same seed, same call


def test_auto_tool_choice_parses_pythonic_replies(client):
    # The tiny model never calls a tool on its own: a regex constraint makes it write Llama 4's
    # pythonic format, so the reply goes through the llama4_pythonic parser.
    forced = {"structured_outputs": {"regex": r'\[get_weather\(city="(Paris|Rome)", days=[1-7]\)\]'}}
    r = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, max_completion_tokens=40,
                                       temperature=0, extra_body=forced)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather"
    _check_call("get_weather", call.function.arguments)
    content, calls, finish, _ = _collect_stream(client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, max_completion_tokens=40, temperature=0, extra_body=forced,
        stream=True))
    assert finish == "tool_calls" and content == "" and calls[0]["arguments"] == call.function.arguments

    # malformed (cut-off) call: plain content, never a 500
    cut = {"structured_outputs": {"regex": r'\[get_weather\(city="Paris", days=[1-7]'}}
    r = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, max_completion_tokens=40,
                                       temperature=0, extra_body=cut)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith('[get_weather(city="Paris", days=')
    content, calls, finish, _ = _collect_stream(client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, max_completion_tokens=40, temperature=0, extra_body=cut,
        stream=True))
    assert calls == [] and content == r.choices[0].message.content and finish == "stop"

    # a plain reply stays content; tool_choice none never parses
    r = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                       max_completion_tokens=8, temperature=0, extra_body=forced)
    assert r.choices[0].message.content.startswith("[get_weather(") and not r.choices[0].message.tool_calls


def test_tool_results_in_later_turns(server, client):
    msgs = _conversation()[1:]
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_completion_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tokens = httpx.post(server.url + "/tokenize", json={"model": "m", "messages": msgs, "tools": TOOLS}).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", json={"model": "m", "tokens": tokens}).json()["prompt"]
    assert '[get_weather(city="Paris", days=3)]' in text and '{"forecast": "sunny"}' in text
    assert r.usage.prompt_tokens == len(tokens)


def test_tool_choice_errors(client):
    bad = [(dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
           (dict(tool_choice="required"), "tool_choice"),
           (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
           (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools"),
           (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice")]
    for kw, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=MESSAGES, max_completion_tokens=4, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)


def test_auto_needs_the_flags():
    from fastapi.testclient import TestClient

    from herd.config import EngineConfig
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.server.app import build_app

    engine = AsyncLLMEngine(EngineConfig.from_kwargs(default_model_path(), dtype="float32", block_size=16,
                                                     num_kv_blocks=32, max_model_len=256, device="cpu"))
    try:
        http = TestClient(build_app(engine, SimpleNamespace(served_model_name=["m"])))
        body = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 4}
        r = http.post("/v1/chat/completions", json=body)  # no tool_choice: "auto"
        assert r.status_code == 400 and "--enable-auto-tool-choice" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] == []
        # required / named need no parser: structured outputs enforce them
        r = http.post("/v1/chat/completions", json={**body, "max_tokens": 40, "temperature": 0,
                                                    "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
        assert r.status_code == 200
        _check_call("get_time", r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    finally:
        engine.shutdown()


def test_cli_tool_flags(capsys):
    from herd.cli import build_parser
    from herd.server.cli import resolve_args

    argv = ["serve", "--enable-auto-tool-choice", "--tool-call-parser", "llama4_json", "--chat-template", "llama4_json"]
    args = build_parser(argv).parse_args(argv)
    resolve_args(args)
    assert args.tool_call_parser == "llama4_json" and "parameters" in args.chat_template
    for argv, message in ((["serve", "--enable-auto-tool-choice"], "requires --tool-call-parser"),
                          (["serve", "--tool-call-parser", "nope"], "invalid tool call parser")):
        args = build_parser(argv).parse_args(argv)
        with pytest.raises(ValueError, match=message):
            resolve_args(args)
