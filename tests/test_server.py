"""`herd serve`: the official openai client against a real server process on loopback, plus
in-process checks of the CLI flags, generation_config defaults and a dead engine."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.server_utils import RemoteServer

API_KEY = "sk-herd-test"
MODEL = "tiny-scout"
MAX_MODEL_LEN = 256
NUM_BLOCKS = 256
PROMPT = "The quick brown fox jumps over"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about llamas."}]
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(scout_dir):
    srv = RemoteServer(scout_dir, [
        "--dtype", "float32", "--block-size", "4", "--num-kv-blocks", str(NUM_BLOCKS),
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64", "--served-model-name", MODEL, "alias",
        "--disable-log-requests", "--disable-uvicorn-access-log", "--disable-log-stats", "--device", "cpu",
        "--seed", "0"], api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _running_and_free(server) -> tuple[float, float, float]:
    m = server.metrics()
    return (m[("vllm:num_requests_running", ())], m[("herd:kv_cache_free_blocks", (("group", "full"),))],
            m[("herd:kv_cache_total_blocks", (("group", "full"),))])


def _wait_idle(server, timeout: float = 10.0) -> tuple[float, float, float]:
    deadline = time.time() + timeout
    while True:
        running, free, total = _running_and_free(server)
        if (running == 0 and free == total) or time.time() > deadline:
            return running, free, total
        time.sleep(0.05)


# -- basic endpoints ---------------------------------------------------------------------------

def test_health_version_models(server, client):
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    assert httpx.get(server.url + "/version").json()["version"]
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, "alias"]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_tokenize_detokenize(server, client):
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}, headers=server.headers).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == MAX_MODEL_LEN
    assert r["tokens"][0] == 1  # BOS
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"][1:]}, headers=server.headers).json()
    assert back["prompt"] == PROMPT
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 6]}, headers=server.headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# -- generation --------------------------------------------------------------------------------

def test_chat_completion(server, client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=6, **GREEDY)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    chat_ids = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, headers=server.headers).json()
    assert r.usage.prompt_tokens == chat_ids["count"]
    again = client.chat.completions.create(model="alias", messages=MESSAGES, max_tokens=6, **GREEDY)
    assert again.choices[0].message.content == choice.message.content and again.model == "alias"
    # echo: the reply starts with the last message when it has the reply's role
    cont = [*MESSAGES, {"role": "assistant", "content": "Llamas"}]
    r = client.chat.completions.create(model=MODEL, messages=cont, max_completion_tokens=3,
                                       temperature=0.0, extra_body={"echo": True, "ignore_eos": True,
                                                                    "add_generation_prompt": False,
                                                                    "continue_final_message": True})
    assert r.choices[0].message.content.startswith("Llamas") and r.usage.completion_tokens == 3


def test_completion_prompts_and_echo(server, client):
    kw = dict(model=MODEL, max_tokens=5, **GREEDY)
    text = client.completions.create(prompt=PROMPT, **kw).choices[0].text
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=server.headers).json()["tokens"]
    assert client.completions.create(prompt=ids, **kw).choices[0].text == text
    echoed = client.completions.create(prompt=PROMPT, echo=True, **kw).choices[0].text
    assert echoed == PROMPT + text
    both = client.completions.create(prompt=[PROMPT, "Llamas graze"], **kw)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == text
    single = client.completions.create(prompt="Llamas graze", **kw).choices[0].text
    assert both.choices[1].text == single
    assert both.usage.completion_tokens == 10


def test_streaming_matches_non_streaming(client):
    kw = dict(model=MODEL, max_tokens=12, **GREEDY)
    full = client.completions.create(prompt=PROMPT, **kw)
    chunks = list(client.completions.create(prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens

    chat_kw = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=8, **GREEDY)
    full = client.chat.completions.create(**chat_kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **chat_kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_n2_and_seed(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, temperature=1.0,
                                                 max_completion_tokens=5, stream=True,
                                                 extra_body={"ignore_eos": True}))
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]  # each sample ends exactly once


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=3, temperature=0.0,
                                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and token.startswith("token_id:") and token_lp <= 0
        assert top[token] == token_lp == pytest.approx(max(top.values()))  # greedy: the most likely token
    assert lp.text_offset == sorted(lp.text_offset)
    # echo + logprobs: the prompt's tokens come first, the first one without a logprob
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=1, echo=True, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + 2 and lp.token_logprobs[0] is None
    assert all(v is not None for v in lp.token_logprobs[1:])
    # Token strings: each token decoded on its own (tokens of one character may collide in the dict).
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=2, **GREEDY)
    assert 1 <= min(len(t) for t in r.choices[0].logprobs.top_logprobs)
    assert max(len(t) for t in r.choices[0].logprobs.top_logprobs) <= 3

    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5,
                                       logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for item in content:
        values = [t.logprob for t in item.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert item.logprob == pytest.approx(values[0])
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=24, **GREEDY)
    reference = client.completions.create(**kw).choices[0].text
    # A two-character stop string whose first occurrence is inside the reference text.
    k = next(k for k in range(1, len(reference) - 1)
             if "\ufffd" not in reference[k:k + 2] and reference.find(reference[k:k + 2]) == k)
    stop = reference[k:k + 2]
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.text == reference[:k] and r.finish_reason == "stop" and r.model_extra["stop_reason"] == stop
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == reference[:k]
    kw["extra_body"] = {"ignore_eos": True, "include_stop_str_in_output": True}
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == reference[:k + 2]


# -- errors ------------------------------------------------------------------------------------

def test_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1.0)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    assert e.value.body["type"] == "BadRequestError" and e.value.body["code"] == 400

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="llama " * 300)
    assert "maximum context length" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=MAX_MODEL_LEN)
    assert "maximum context length" in e.value.body["message"]

    with pytest.raises(openai.BadRequestError) as e:  # a pydantic error is a 400, not FastAPI's 422
        client.completions.create(model=MODEL, prompt=PROMPT, n="two")
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, n=2, temperature=0.0)
    assert e.value.body["param"] == "n"

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert e.value.body["message"] == "The model `no-such-model` does not exist."
    assert e.value.body["param"] == "model"

    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x", ', headers=server.headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    r = httpx.post(server.url + "/v1/completions", json=[1, 2], headers=server.headers)
    assert r.status_code == 400

    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 200  # not guarded, as in vLLM


def test_metrics_counters_move(server, client):
    before = server.metrics()
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, **GREEDY)
    after = server.metrics()

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("vllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("vllm:generation_tokens_total") == 7
    assert delta("vllm:request_success_total", (("finished_reason", "length"),)) == 1
    for hist in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_time_per_output_token_seconds", "vllm:request_prompt_tokens"):
        assert delta(hist + "_count") == 1
    assert delta("vllm:request_generation_tokens_sum") == 7
    assert delta("vllm:inter_token_latency_seconds_count") >= 1
    assert after[("vllm:num_requests_running", ())] == 0
    assert ("vllm:kv_cache_usage_perc", ()) in after


def test_client_disconnect_frees_blocks(server):
    _wait_idle(server)
    before = server.metrics()
    prompt_len = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=server.headers).json()["count"]
    max_tokens = MAX_MODEL_LEN - prompt_len
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines, seen = resp.iter_lines(), 0
            while seen < 3:  # (breaking out of a for loop would close the response already)
                seen += next(lines).startswith("data: {")
            running, free, total = _running_and_free(server)
            assert running == 1 and free < total  # the request holds KV blocks while streaming
    # Leaving the block closed the connection mid-stream.
    running, free, total = _wait_idle(server)
    assert running == 0 and free == total
    after = server.metrics()
    aborts = ("vllm:request_success_total", (("finished_reason", "abort"),))
    assert after.get(aborts, 0) - before.get(aborts, 0) == 1
    generated = after[("vllm:generation_tokens_total", ())] - before[("vllm:generation_tokens_total", ())]
    assert 3 <= generated < max_tokens  # it stopped early

    # A non-streaming request whose client gives up is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, headers=server.headers,
                   timeout=0.3)
    running, free, total = _wait_idle(server)
    assert running == 0 and free == total
    final = server.metrics()
    assert final[aborts] - after[aborts] == 1
    assert final[("vllm:generation_tokens_total", ())] - after[("vllm:generation_tokens_total", ())] < max_tokens


def test_concurrent_streams_and_failures(server):
    """32 streams at once complete; bad requests in the middle of them fail alone."""
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def stream(i):
            s = await aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"llama number {i}"}], stream=True,
                max_completion_tokens=8, temperature=0.8, seed=i, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            text, usage, reasons = "", None, []
            async for c in s:
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    reasons += [c.choices[0].finish_reason] if c.choices[0].finish_reason else []
                usage = c.usage or usage
            return text, usage, reasons

        async def bad():
            with pytest.raises(openai.BadRequestError):
                await aclient.completions.create(model=MODEL, prompt=PROMPT, top_p=5.0)

        results = await asyncio.gather(*[stream(i) for i in range(32)], *[bad() for _ in range(4)])
        await aclient.close()
        return results[:32]

    results = asyncio.run(main())
    assert len(results) == 32
    for _, usage, reasons in results:
        assert usage.completion_tokens == 8 and reasons == ["length"]
    running, free, total = _wait_idle(server)
    assert running == 0 and free == total


# -- in-process: stream deltas, CLI flags, generation_config defaults, dead engine -------------

def test_stream_holds_back_partial_stop_strings():
    from herd.engine.outputs import CompletionOutput
    from herd.engine.sampling_params import SamplingParams
    from herd.server.serving import ChoiceCursor

    params = SamplingParams(stop=["X!"], max_tokens=10)

    def run(steps):
        cur, sent = ChoiceCursor(), []
        for i, (text, reason) in enumerate(steps):
            sent.append(cur.advance(CompletionOutput(0, text, list(range(i + 1)), finish_reason=reason), params)[0])
        return sent, cur

    # "X" might start "X!": held back, then dropped when the engine cuts the stop string.
    sent, cur = run([("Hel", None), ("Hello X", None), ("Hello ", "stop")])
    assert sent == ["Hel", "lo ", ""] and cur.finished and cur.tokens_sent == 3
    # A false alarm: the held-back "X" goes out with the next text.
    sent, _ = run([("Hello X", None), ("Hello Xy", None), ("Hello Xyz", "length")])
    assert sent == ["Hello ", "Xy", "z"]
    # include_stop_str_in_output: nothing is held back.
    params = SamplingParams(stop=["X!"], include_stop_str_in_output=True)
    sent, _ = run([("Hello X", None), ("Hello X!", "stop")])
    assert sent == ["Hello X", "!"]


def test_cli_flags(scout_dir, capsys):
    from herd.cli import build_parser
    from herd.config import EngineConfig
    from herd.hub.default import default_model_path
    from herd.server.cli import engine_kwargs, resolve_args

    gaudi = ["serve", scout_dir, "--tensor-parallel-size", "8", "--max-model-len", "4096", "--block-size", "128",
             "--quantization", "inc", "--kv-cache-dtype", "fp8_inc", "--distributed_executor_backend", "ray",
             "--gpu_memory_utilization", "0.95", "--host", "::", "--port", "8000", "--dtype", "bfloat16",
             "--trust_remote_code", "--use-v2-block-manager", "--max-num-seqs", "32"]
    args = build_parser(gaudi).parse_args(gaudi)
    assert (args.tensor_parallel_size, args.max_model_len, args.block_size, args.quantization) == (8, 4096, 128, "inc")
    assert (args.distributed_executor_backend, args.gpu_memory_utilization, args.host) == ("ray", 0.95, "::")
    resolve_args(args)
    engine_kwargs(args)
    assert "not needed" in capsys.readouterr().err
    assert args.model == scout_dir and args.served_model_name is None

    argv = ["serve", "--model", scout_dir, "--max_model_len", "0.5k", "--block_size", "8", "--num-kv-blocks", "64",
            "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5", "--dtype", "float32",
            "--served-model-name", "a", "b", "--device", "cpu"]
    args = build_parser(argv).parse_args(argv)
    resolve_args(args)
    cfg = EngineConfig.from_kwargs(args.model, **engine_kwargs(args))
    assert cfg.model.max_model_len == 500 and cfg.cache.block_size == 8 and cfg.cache.num_kv_blocks == 64
    assert cfg.cache.enable_prefix_caching is False and cfg.cache.gpu_memory_utilization == 0.5
    assert args.served_model_name == ["a", "b"]

    argv = ["serve", "--port", "9000"]  # no MODEL: the embedded default model
    args = build_parser(argv).parse_args(argv)
    resolve_args(args)
    assert args.model == default_model_path() and args.served_model_name == ["default"]

    with pytest.raises(SystemExit) as e:
        bad = ["serve", scout_dir, "--no-such-flag", "1"]
        build_parser(bad).parse_args(bad)
    assert e.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def _in_process(model_dir, **flags):
    from fastapi.testclient import TestClient

    from herd.config import EngineConfig
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.server.app import build_app

    engine = AsyncLLMEngine(EngineConfig.from_kwargs(model_dir, dtype="float32", block_size=4, num_kv_blocks=64,
                                                     max_model_len=128, device="cpu"))
    args = SimpleNamespace(served_model_name=["m"], **flags)
    return engine, TestClient(build_app(engine, args))


def test_generation_config_defaults(scout_dir, tmp_path):
    model_dir = tmp_path / "ckpt"
    shutil.copytree(scout_dir, model_dir)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen.update(temperature=0.0, max_new_tokens=3)  # greedy by default, 3 new tokens by default
    (model_dir / "generation_config.json").write_text(json.dumps(gen))
    engine, http = _in_process(str(model_dir))
    try:
        body = {"messages": MESSAGES, "ignore_eos": True}
        r = http.post("/v1/chat/completions", json={**body, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # greedy came from the checkpoint
        r = http.post("/v1/chat/completions", json={**body, "n": 2, "temperature": 0.8})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert r.json()["usage"]["completion_tokens"] == 6  # max_new_tokens default, per sample
        r = http.post("/v1/chat/completions", json={**body, "max_completion_tokens": 5})
        assert r.json()["usage"]["completion_tokens"] == 5  # the request wins over the default
    finally:
        engine.shutdown()


def test_dead_engine_health_and_watcher(scout_dir):
    from herd.server.cli import watch_engine

    engine, http = _in_process(scout_dir)
    try:
        assert http.get("/health").status_code == 200
        engine.errored = RuntimeError("device lost")
        assert http.get("/health").status_code == 503
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 500 and "engine has stopped" in r.json()["error"]["message"]
        fake_server = SimpleNamespace(should_exit=False)
        died = asyncio.run(asyncio.wait_for(watch_engine(engine, fake_server, interval=0.01), 5))
        assert died and fake_server.should_exit
    finally:
        engine.errored = None
        engine.shutdown()
