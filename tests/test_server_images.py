"""Images through `herd serve`: chat image_url parts reach the vision tower; bad or forbidden images
get a 400 and nothing else is lost."""
import base64
import io
from contextlib import contextmanager
from types import SimpleNamespace

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
def mm_dir(tmp_path_factory):
    return make_tiny_multimodal_checkpoint(tmp_path_factory.mktemp("mm_serve"), "scout")


@pytest.fixture(scope="module")
def mm_server(mm_dir, tmp_path_factory):
    path = mm_dir
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


# -- images refused before anything is fetched (in process, the media connector spied on) ----------

@contextmanager
def in_process(model_dir, **engine_args):
    from fastapi.testclient import TestClient

    from herd.engine.arg_utils import AsyncEngineArgs
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.server.app import build_app

    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=model_dir, dtype="float32", max_model_len=200, block_size=4, num_kv_blocks=256, device="cpu",
        **engine_args))
    try:
        yield TestClient(build_app(engine, SimpleNamespace(served_model_name=["m"])))
    finally:
        engine.shutdown()


@pytest.fixture
def fetched(monkeypatch):
    """The URLs the server's media connector was asked for."""
    from herd.multimodal.media import MediaConnector

    urls, load = [], MediaConnector.load_bytes

    def spy(self, url):
        urls.append(url)
        return load(self, url)

    monkeypatch.setattr(MediaConnector, "load_bytes", spy)
    return urls


def error_of(r, param):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    return err["message"]


NOT_AN_IMAGE = "data:image/png;base64,bm90IGFuIGltYWdl"   # "not an image"


def test_text_model_refuses_image_parts_without_fetching(scout_dir, fetched):
    no_vision = "this model does not accept image input (it has no vision tower)"
    with in_process(scout_dir) as http:
        parts = [{"type": "image_url", "image_url": {"url": NOT_AN_IMAGE}}, {"type": "text", "text": "hi"}]
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}],
                                                    "max_tokens": 2})
        assert error_of(r, "messages") == f"The messages contain an image, but {no_vision}"
        r = http.post("/v1/responses", json={"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": NOT_AN_IMAGE}, {"type": "input_text", "text": "hi"}]}]})
        assert error_of(r, "input") == f"The input contains an image, but {no_vision}"
        r = http.post("/v1/completions", json={"prompt": f"x ![]({NOT_AN_IMAGE}) y", "max_tokens": 2})
        assert error_of(r, "prompt") == f"The prompt contains a markdown image `![](...)`, but {no_vision}"
        assert fetched == []
        ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_image_limit_is_checked_before_fetching(mm_dir, fetched):
    limit = "At most 1 image(s) may be provided in one prompt."
    # the second image, if it were fetched, would fail differently: local files are not enabled
    two = [data_url(IMG_A), "file:///no/such/image.png"]
    with in_process(mm_dir, limit_mm_per_prompt={"image": 1}) as http:
        parts = [*({"type": "image_url", "image_url": {"url": u}} for u in two), {"type": "text", "text": "Compare."}]
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}],
                                                    "max_tokens": 2})
        assert error_of(r, "messages") == limit
        r = http.post("/v1/responses", json={"input": [{"role": "user", "content": [
            *({"type": "input_image", "image_url": u} for u in two), {"type": "input_text", "text": "Compare."}]}]})
        assert error_of(r, "input") == limit
        r = http.post("/v1/completions", json={"prompt": f"![]({two[0]}) and ![]({two[1]})", "max_tokens": 2})
        assert error_of(r, "prompt") == limit
        assert fetched == []
        # one image is within the limit: fetched and run
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts[:1]}],
                                                    "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert fetched == two[:1]
