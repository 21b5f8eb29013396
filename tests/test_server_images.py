"""Images through `herd serve`: chat image_url parts reach the vision tower; bad or forbidden images
get a 400 and nothing else is lost."""
import base64
import io

import httpx
import pytest

from herd import LLM, SamplingParams
from tests.server_utils import RemoteServer
from tests.test_multimodal_engine import IMG_A, picture
from tests.tiny_models import make_tiny_multimodal_checkpoint


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def mm_server(tmp_path_factory):
    path = make_tiny_multimodal_checkpoint(tmp_path_factory.mktemp("mm_serve"), "scout")
    media = tmp_path_factory.mktemp("media")
    picture(40, 40, 7).save(media / "ok.png")
    server = RemoteServer(path, ["--dtype", "float32", "--max-model-len", "200", "--block-size", "4",
                                 "--num-kv-blocks", "256", "--allowed-local-media-path", str(media)])
    yield path, media, server
    server.stop()


def chat(server, parts, max_tokens=6):
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def test_image_url_parts_reach_the_model(mm_server):
    path, media, server = mm_server
    parts = [{"type": "image_url", "image_url": {"url": data_url(IMG_A)}}, {"type": "text", "text": "Describe."}]
    r = chat(server, parts)
    assert r.status_code == 200, r.text
    llm = LLM(path, dtype="float32", max_model_len=200, block_size=4, num_kv_blocks=256)
    want = llm.chat([{"role": "user", "content": parts}], SamplingParams(temperature=0, max_tokens=6),
                    use_tqdm=False)[0]
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids) > 40  # expanded image tokens
    assert body["choices"][0]["message"]["content"] == want.outputs[0].text
    other = chat(server, [{"type": "image_url", "image_url": {"url": data_url(picture(60, 100, 2))}},
                          {"type": "text", "text": "Describe."}])
    assert other.status_code == 200 and other.json()["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"]
    local = chat(server, [{"type": "image_url", "image_url": {"url": f"file://{media}/ok.png"}}])
    assert local.status_code == 200, local.text


@pytest.mark.parametrize("url", ["data:image/png;base64,bm90IGFuIGltYWdl", "file:///etc/passwd",
                                 "http://127.0.0.1:1/x.png", "https://example.com/cat.png"])
def test_bad_or_forbidden_images_are_400(mm_server, url):
    _, _, server = mm_server
    r = chat(server, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_markdown_images_in_completion_prompts(mm_server):
    path, _, server = mm_server
    prompt = f"The fox ![]({data_url(IMG_A)}) jumps over"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200, r.text
    llm = LLM(path, dtype="float32", max_model_len=200, block_size=4, num_kv_blocks=256)
    want = llm.generate({"prompt": "The fox <|image|> jumps over", "multi_modal_data": {"image": IMG_A}},
                        SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert r.json()["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert r.json()["choices"][0]["text"] == want.outputs[0].text
    bad = httpx.post(server.url + "/v1/completions",
                     json={"prompt": "x ![](file:///etc/passwd)", "max_tokens": 2}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 400
