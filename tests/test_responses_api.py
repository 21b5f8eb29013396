"""POST /v1/responses with the official openai client (`client.responses.create`), text and images,
streaming and not: the same tokens as the equivalent chat completion, in the Responses shapes."""
from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest

from tests.server_utils import RemoteServer
from tests.test_multimodal_engine import IMG_A
from tests.tiny_models import make_tiny_multimodal_checkpoint

API_KEY = "sk-responses"
MODEL = "tiny-mm"
GREEDY = dict(temperature=0.0)


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_multimodal_checkpoint(tmp_path_factory.mktemp("responses_mm"), "scout")
    srv = RemoteServer(path, ["--dtype", "float32", "--max-model-len", "200", "--block-size", "4",
                              "--num-kv-blocks", "256", "--served-model-name", MODEL, "--device", "cpu",
                              "--disable-log-stats", "--disable-uvicorn-access-log"], api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat_reply(client, messages, max_tokens):
    return client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=max_tokens, **GREEDY)


def test_text_input_matches_chat(client):
    r = client.responses.create(model=MODEL, input="Tell me about llamas.", max_output_tokens=6, **GREEDY)
    want = chat_reply(client, [{"role": "user", "content": "Tell me about llamas."}], 6)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [c.type for c in item.content] == ["output_text"]
    assert r.output_text and r.output_text == item.content[0].text == want.choices[0].message.content
    assert r.usage.input_tokens == want.usage.prompt_tokens
    assert r.usage.output_tokens == want.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    finished = want.choices[0].finish_reason
    assert r.status == {"length": "incomplete", "stop": "completed"}[finished]
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.max_output_tokens == 6 and r.temperature == 0.0


def test_instructions_and_input_items(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hi there."}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
             {"type": "message", "role": "user", "content": "Name a llama."}]
    r = client.responses.create(model=MODEL, instructions="Be brief.", input=items, max_output_tokens=5,
                                top_p=0.9, **GREEDY)
    want = chat_reply(client, [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi there."},
                               {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Name a llama."}], 5)
    assert r.output_text == want.choices[0].message.content
    assert r.usage.input_tokens == want.usage.prompt_tokens and r.instructions == "Be brief."
    dev = client.responses.create(model=MODEL, input=[{"role": "developer", "content": "Be brief."}, items[-1]],
                                  max_output_tokens=5, **GREEDY)  # developer = system for chat templates
    system = chat_reply(client, [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Name a llama."}], 5)
    assert dev.output_text == system.choices[0].message.content


def test_image_input_matches_chat(client):
    url = data_url(IMG_A)
    r = client.responses.create(model=MODEL, max_output_tokens=5, **GREEDY, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": url}, {"type": "input_text", "text": "Describe."}]}])
    want = chat_reply(client, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                           {"type": "text", "text": "Describe."}]}], 5)
    assert r.output_text == want.choices[0].message.content
    assert r.usage.input_tokens == want.usage.prompt_tokens > 40  # the image's tokens


def test_streaming_events(client):
    kw = dict(model=MODEL, input="Tell me about llamas.", max_output_tokens=8, **GREEDY)
    full = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-4]
    final = events[-1].response
    assert text == done.text == final.output_text == full.output_text
    assert done.item_id == final.output[0].id and final.usage.output_tokens == full.usage.output_tokens
    assert final.status == full.status and final.id == events[0].response.id


def test_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_x")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"type": "function_call_output", "call_id": "c", "output": "1"}])
    assert e.value.body["param"] == "input" and "function_call_output" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "function", "name": "f", "parameters": {}}])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=500)
    assert "maximum context length" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_123")  # nothing is stored
    assert httpx.post(server.url + "/v1/responses", json={"input": "hi"}).status_code == 401


def test_text_format_maps_to_structured_output(client):
    r = client.responses.create(model=MODEL, input="Give me JSON.", max_output_tokens=12,
                                text={"format": {"type": "json_object"}}, **GREEDY)
    assert r.output_text.startswith("{") and r.text.format.type == "json_object"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", text={"format": {"type": "grammar"}})
    assert e.value.body["param"] == "text"
