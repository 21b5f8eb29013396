"""Attacks on `herd serve` (issue "Reliability and security"): each test sends one attack to a real
server process on 127.0.0.1 (or drives the component in process) and checks the guarantee
documented in docs/reliability.md, "Attacks (server)". Every loop and wait here is bounded.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from herd.engine.sampling_params import MAX_BAD_WORDS
from tests.server_utils import REPO, RemoteServer

KEY = "sk-attacks"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
MAX_MODEL_LEN = 1024
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
WRITE_TIMEOUT = 1.5
ARGS = ["--dtype", "float32", "--device", "cpu", "--block-size", "4", "--num-kv-blocks", "4608",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64", "--served-model-name", MODEL,
        "--disable-log-requests", "--disable-uvicorn-access-log", "--disable-log-stats", "--seed", "0",
        "--max-logprobs", "20", "--header-read-timeout", str(HEADER_TIMEOUT),
        "--body-read-timeout", str(BODY_TIMEOUT), "--timeout-keep-alive", "2",
        "--stream-write-timeout", str(WRITE_TIMEOUT), "--limit-concurrency", "400"]


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory):
    from tests.tiny_models import make_tiny_multimodal_checkpoint

    return make_tiny_multimodal_checkpoint(tmp_path_factory.mktemp("attacks_mm"), "scout",
                                           max_position_embeddings=MAX_MODEL_LEN)  # the server's context fits


@pytest.fixture(scope="module")
def server(mm_dir):
    """A multimodal tiny checkpoint (text prompts work too; image parts and ![](url) are live)."""
    srv = RemoteServer(mm_dir, ARGS, api_key=KEY)
    yield srv
    srv.stop()


def post(server, path, body, timeout=60, **kw):
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=timeout, **kw)


def assert_error(r: httpx.Response, status: int, param="any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


class HealthProbe:
    """Polls /health from a thread while an attack runs; `worst` is the slowest answer (s)."""

    def __init__(self, server, interval=0.05):
        self.server, self.interval, self.worst, self.count = server, interval, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    c.get(self.server.url + "/health")
                except httpx.HTTPError:
                    pass
                self.worst = max(self.worst, time.monotonic() - t0)
                self.count += 1
                self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(35)


def wait_idle(server, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(server.url + "/load", timeout=10).json()["server_load"] == 0:
            return True
        time.sleep(0.1)
    return False


def greedy(prompt, n_tokens, **kw):
    return {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0.0, "ignore_eos": True, **kw}


def stream_text(server, body) -> str:
    text = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += [c["text"] for c in event["choices"]]
    return "".join(text)


# -- 1. duplicate request ids --------------------------------------------------------------------

def test_duplicate_request_id_never_mixes_streams(server):
    """A client hangs up on stream A with request_id R and at once sends B with R; and two live
    streams share an id. Every stream gets exactly its own text."""
    a = greedy([1] + [7 + i for i in range(40)], 200)
    b = greedy([1] + [300 - i for i in range(25)], 30)
    want_b = post(server, "/v1/completions", b).json()["choices"][0]["text"]
    want_a = post(server, "/v1/completions", greedy(a["prompt"], 30)).json()["choices"][0]["text"]
    assert want_a != want_b
    for attempt in range(4):
        rid = f"dup-{attempt}"
        with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=60,
                          json={**a, "stream": True, "request_id": rid}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # A is generating: hang up now
        assert stream_text(server, {**b, "request_id": rid}) == want_b, attempt
    # Two live streams with one id at once.
    out = {}

    def run(name, body):
        out[name] = stream_text(server, {**body, "request_id": "same"})

    threads = [threading.Thread(target=run, args=("a", greedy(a["prompt"], 30))),
               threading.Thread(target=run, args=("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {"a": want_a, "b": want_b}
    r = post(server, "/v1/completions", {**b, "request_id": "visible-id"})
    assert r.json()["id"] == "visible-id"  # the client's id is kept as given
    assert wait_idle(server)


def test_resent_request_id_never_gets_the_old_requests_output(scout_dir):
    """Deterministic form of the race: A (id R) is closed while an engine step that runs A is in
    flight, and B registers with id R before that step's outputs come out."""
    from herd.config import EngineConfig
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.engine.sampling_params import SamplingParams

    engine = AsyncLLMEngine(EngineConfig.from_kwargs(scout_dir, dtype="float32", block_size=4, num_kv_blocks=64,
                                                     max_model_len=128, device="cpu"))
    real_step, in_step = engine.engine.step, threading.Event()

    def slow_step():
        in_step.set()
        time.sleep(0.3)
        return real_step()

    engine.engine.step = slow_step
    params = SamplingParams(max_tokens=20, ignore_eos=True, temperature=0)
    try:
        async def go():
            a = engine.generate([1, 5, 6, 7], params, "R")
            await a.__anext__()
            in_step.clear()
            while not in_step.is_set():  # the next step (running A) has started
                await asyncio.sleep(0.005)
            await a.aclose()
            b = engine.generate([1, 40, 41], params, "R")
            outs = [o async for o in b]
            return outs

        outs = asyncio.run(asyncio.wait_for(go(), 30))
        assert outs and all(o.prompt_token_ids == [1, 40, 41] and o.request_id == "R" for o in outs)
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 20
    finally:
        engine.shutdown()


def test_slow_reader_gets_the_newest_output_not_a_backlog(scout_dir):
    """The engine keeps one (cumulative) output per request for its caller: a caller that reads
    late finds the newest one, however many steps ran meanwhile."""
    from herd.config import EngineConfig
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.engine.sampling_params import SamplingParams

    engine = AsyncLLMEngine(EngineConfig.from_kwargs(scout_dir, dtype="float32", block_size=4, num_kv_blocks=64,
                                                     max_model_len=128, device="cpu"))
    try:
        async def go():
            stream = engine.generate([1, 5, 6], SamplingParams(max_tokens=40, ignore_eos=True, temperature=0),
                                     "slow")
            first = await stream.__anext__()
            deadline = time.monotonic() + 15
            while engine.get_stats().num_running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # not reading while the engine steps
            rest = [o async for o in stream]
            return first, rest

        first, rest = asyncio.run(go())
        assert len(rest) == 1 and rest[0].finished and len(rest[0].outputs[0].token_ids) == 40
        assert rest[0].request_id == "slow"
    finally:
        engine.shutdown()


# -- 3. work on the event loop -------------------------------------------------------------------

def test_huge_prompt_does_not_stall_the_event_loop(server):
    """A 10 MB prompt (and one of 6 MB on /tokenize) is refused by its length, fast, off the loop."""
    with HealthProbe(server) as probe:
        t0 = time.monotonic()
        err = assert_error(post(server, "/v1/completions", {"prompt": "llama " * 1_700_000, "max_tokens": 2}),
                           400, "input_tokens")
        assert "characters" in err["message"]
        assert_error(post(server, "/tokenize", {"prompt": "x y " * 1_500_000}), 400, "input_tokens")
        elapsed = time.monotonic() - t0
    assert elapsed < 8 and probe.worst < 2.0, (elapsed, probe.worst)
    # Within the character limit, tokenizing runs in a worker thread; the token limit still holds.
    assert_error(post(server, "/v1/completions", {"prompt": "llama " * 5000, "max_tokens": 2}), 400, "input_tokens")
    assert post(server, "/tokenize", {"prompt": "hello there"}).json()["count"] > 0


def test_tokenize_and_detokenize_follow_the_api_key(server):
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})):
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        assert post(server, path, body).status_code == 200


def test_request_limits_are_400s(server):
    too_many_stops = {"prompt": "x", "max_tokens": 2, "stop": [f"s{i}" for i in range(65)]}
    long_stop = {"prompt": "x", "max_tokens": 2, "stop": ["s" * 257]}
    cases = [
        (too_many_stops, "stop"), (long_stop, "stop"),
        ({"prompt": "x", "max_tokens": 2, "bad_words": [f"w{i}" for i in range(MAX_BAD_WORDS + 1)]}, "bad_words"),
        ({"prompt": "x", "max_tokens": 2, "stop_token_ids": list(range(1025))}, "stop_token_ids"),
        ({"prompt": "x", "max_tokens": 2, "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
        ({"prompt": ["x"] * 1025, "max_tokens": 1}, "prompt"),
        ({"prompt": "x", "max_tokens": 2, "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "max_tokens": 2, "prompt_logprobs": 21}, "prompt_logprobs"),
    ]
    with HealthProbe(server) as probe:
        for body, param in cases:
            assert_error(post(server, "/v1/completions", body), 400, param)
        t0 = time.monotonic()  # 100,000 prompts: refused before any is tokenized
        assert_error(post(server, "/v1/completions", {"prompt": ["hi"] * 100_000, "max_tokens": 1}), 400, "prompt")
        assert time.monotonic() - t0 < 5
    assert probe.worst < 2.0, probe.worst
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stop": ["s"] * 65}
    assert_error(post(server, "/v1/chat/completions", chat), 400, "stop")
    # At the limits: 64 stop strings of 256 characters stream fine.
    stops = ["".join(random.Random(i).choice("abc ") for _ in range(256)) for i in range(64)]
    text = stream_text(server, greedy("The herd", 60, stop=stops))
    assert isinstance(text, str)


def test_partial_stop_check_matches_and_is_cheap():
    from herd.engine.tokenizer import partial_stop_length

    def _partial_stop_length(text, stop):  # the definition, checked naively
        return max([n for s in stop for n in range(1, min(len(s) - 1, len(text)) + 1)
                    if text.endswith(s[:n])], default=0)

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 4))]
        assert partial_stop_length(text, stops) == _partial_stop_length(text, stops), (text, stops)
    text, stops = "a" * 200_000, ["a" * 255 + "b"] * 64
    t0 = time.perf_counter()
    for _ in range(100):
        assert partial_stop_length(text, stops) == 255
    text, stops = "abc " * 50_000, ["xyz" * 85] * 64  # the old check: ~2.4 ms per chunk here
    for _ in range(100):
        assert partial_stop_length(text, stops) == 0
    assert time.perf_counter() - t0 < 1.0  # per chunk: independent of the output length


def test_markdown_image_scan_is_linear():
    import re

    from herd.server.serving_completion import find_md_images

    rx = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
    rng = random.Random(1)
    for _ in range(5000):
        text = "".join(rng.choice("![]() ax\n") for _ in range(rng.randint(0, 30)))
        assert find_md_images(text) == [(m.start(), m.end(), m.group(1)) for m in rx.finditer(text)], text
    for attack in ("![](" * 50_000, "![" * 100_000, "![](a" * 40_000, "![]" * 60_000):
        t0 = time.perf_counter()
        find_md_images(attack)
        assert time.perf_counter() - t0 < 0.5, attack[:8]


def test_markdown_image_attack_does_not_stall(server):
    """60 kB of `![](` (within the character limit): the old regex took seconds of event loop."""
    with HealthProbe(server) as probe:
        t0 = time.monotonic()
        assert_error(post(server, "/v1/completions", {"prompt": "![](" * 15_000, "max_tokens": 1}), 400,
                     "input_tokens")
        elapsed = time.monotonic() - t0
    assert elapsed < 8 and probe.worst < 2.0, (elapsed, probe.worst)


# -- 5. slow consumers ---------------------------------------------------------------------------

def test_stream_that_is_never_read_is_dropped(server):
    """A client that sends a big streaming request and never reads is dropped after
    --stream-write-timeout; its request is aborted and its KV blocks freed."""
    # 16 echoed 1,000-token prompts with 20 top logprobs each: ~8 MB of events at once, more than
    # the socket buffers hold.
    prompt = [1] + [(9 + i) % 200 + 3 for i in range(1000)]
    body = json.dumps(greedy(prompt, 8, n=16, logprobs=20, echo=True, stream=True, temperature=1.0)).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", server.port))
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 15
        dropped = False
        while time.monotonic() < deadline and not dropped:
            time.sleep(0.25)
            dropped = "dropping a streaming client" in server.read_log()
        assert dropped, server.read_log()[-3000:]
        assert wait_idle(server, 10)
        deadline, running = time.monotonic() + 10, None
        while time.monotonic() < deadline and running != [0]:  # the abort reaches the engine
            time.sleep(0.1)
            running = [v for (name, _), v in server.metrics().items() if name == "vllm:num_requests_running"]
        assert running == [0]
    finally:
        s.close()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


# -- 6. bad image parts --------------------------------------------------------------------------

@pytest.mark.parametrize("part", [
    {"type": "image_pil", "image_pil": "not an image"},
    {"type": "image_pil", "image_pil": 5},
    {"type": "image", "image": 7},
    {"type": "image", "image": [1, 2]},
    {"type": "image", "image": {"url": "x"}},
    {"type": "image", "image": ""},
    {"type": "image_url", "image_url": {"url": 3}},
    {"type": "image_url", "image_url": [1]},
])
def test_bad_image_parts_are_400(server, part):
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}], "max_tokens": 2}
    assert_error(post(server, "/v1/chat/completions", body), 400)


# -- 8. prompt logprobs once per prompt ----------------------------------------------------------

def test_prompt_logprobs_are_sent_once_per_prompt(server):
    prompt = [1] + [11 + i for i in range(60)]
    body = {"prompt": [prompt, prompt[:30]], "max_tokens": 2, "n": 4, "temperature": 1.0, "seed": 1,
            "prompt_logprobs": 5}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(8))
    carried = [c["index"] for c in choices if c["prompt_logprobs"] is not None]
    assert carried == [0, 4]
    assert len(choices[0]["prompt_logprobs"]) == 61 and len(choices[4]["prompt_logprobs"]) == 30
    one = post(server, "/v1/completions", {**body, "prompt": prompt, "n": 1}).json()
    assert len(r.content) < 2.6 * len(json.dumps(one))  # not n copies


# -- 11. connection timeouts ---------------------------------------------------------------------

def test_half_open_connections_are_closed(server):
    """Slowloris: 50 connections that send nothing or half a request head are closed after
    --header-read-timeout; a body that stops arriving gets 408 after --body-read-timeout."""
    socks = []
    try:
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if i % 2:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            socks.append(s)
        slow_body = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        socks.append(slow_body)
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          + f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n".encode() + b'{"prompt"')
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # still serving
        closed = 0
        for s in socks[:50]:
            s.settimeout(max(0.1, HEADER_TIMEOUT + 4 - (time.monotonic() - t0)))
            try:
                closed += s.recv(1024) == b""
            except (TimeoutError, socket.timeout):
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == 50, closed
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 4
        slow_body.settimeout(BODY_TIMEOUT + 4)
        data = slow_body.recv(4096)
        assert data.startswith(b"HTTP/1.1 408"), data[:100]
        # A keep-alive connection that goes quiet after its response is closed as well.
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        socks.append(s)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\n")  # half of a second request head, then nothing
        s.settimeout(HEADER_TIMEOUT + 4)
        assert s.recv(4096) == b""
    finally:
        for s in socks:
            s.close()


# -- 12. minor -----------------------------------------------------------------------------------

def test_models_show_the_served_name_not_the_path(server, mm_dir):
    card = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]
    assert card["id"] == card["root"] == MODEL
    assert str(mm_dir) not in json.dumps(card)


def _serve(model, args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    env.pop("VLLM_API_KEY", None)
    if not env_extra or "HERD_API_KEY" not in env_extra:
        env.pop("HERD_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", model, "--host", "127.0.0.1",
                             "--port", "1", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("how", ["flag", "flag-blank", "env"])
def test_empty_api_key_refuses_to_start(scout_dir, how):
    args = ["--device", "cpu", "--dtype", "float32"]
    if how == "flag":
        proc = _serve(scout_dir, [*args, "--api-key", ""])
    elif how == "flag-blank":
        proc = _serve(scout_dir, [*args, "--api-key", "  "])
    else:
        proc = _serve(scout_dir, args, {"HERD_API_KEY": ""})
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("herd serve started with an empty API key")
    assert proc.returncode == 2, out
    assert "empty" in out and "Traceback" not in out


def test_sigint_exits_cleanly(scout_dir):
    srv = RemoteServer(scout_dir, ["--dtype", "float32", "--device", "cpu", "--block-size", "4",
                                   "--num-kv-blocks", "32", "--max-model-len", "64", "--disable-log-stats"])
    try:
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(30) == 0
        assert "Traceback" not in srv.read_log()
    finally:
        srv.stop()


def test_uvicorn_gets_the_connection_limits():
    import argparse

    from herd.server.cli import add_arguments, uvicorn_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["m"])
    cfg = uvicorn_config(object(), args)
    assert cfg.timeout_keep_alive == 5 and cfg.limit_concurrency == 2048
    assert cfg.h11_max_incomplete_event_size == 16 * 1024
    assert cfg.http.__name__ == "HeaderTimeoutH11Protocol"
    args = parser.parse_args(["m", "--limit-concurrency", "0", "--header-read-timeout", "0",
                              "--timeout-keep-alive", "7"])
    cfg = uvicorn_config(object(), args)
    assert cfg.limit_concurrency is None and cfg.http == "h11" and cfg.timeout_keep_alive == 7
