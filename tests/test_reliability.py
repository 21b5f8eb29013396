"""`herd serve` under bad input, load and faults, and its security limits.

Real server processes on 127.0.0.1 for what crosses HTTP and processes (body limits, API key,
load with disconnects, SIGTERM drain, a dead engine's exit status); in-process engines for step
failures, preemption parity, and the media / calibration-file guards.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import importlib.util
import io
import json
import logging
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from types import SimpleNamespace

import httpx
import pytest

from tests.server_utils import REPO, RemoteServer, free_port, spawned_children

API_KEY = "sk-reliability"
MODEL = "tiny"
MAX_MODEL_LEN = 128
BODY_LIMIT = 65536
SERVER_ARGS = ["--dtype", "float32", "--device", "cpu", "--block-size", "4", "--num-kv-blocks", "64",
               "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64", "--served-model-name", MODEL,
               "--disable-log-requests", "--disable-uvicorn-access-log", "--disable-log-stats", "--seed", "0"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def load_script(name: str):
    """Import scripts/<name>.py (registered under scripts_<name>, once)."""
    key = f"scripts_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(REPO, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[key]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    """The vLLM/OpenAI error body: {"error": {"message", "type", "param", "code"}}, code == status."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "any":
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def server(scout_dir):
    srv = RemoteServer(scout_dir, [*SERVER_ARGS, "--max-request-body-bytes", str(BODY_LIMIT)], api_key=API_KEY)
    yield srv
    srv.stop()


def idle_state(server, timeout: float = 20.0) -> dict:
    lt = load_script("load_test")

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            return await lt.wait_idle(c, timeout)

    idle, state = asyncio.run(go())
    assert idle, state
    return state


# -- hand-written bad input --------------------------------------------------------------------

JSON = {"content-type": "application/json"}
# (path, raw body, expected status, expected param or "any")
BAD_INPUTS = [
    ("/v1/completions", b'{"prompt": "x", ', 400, None),                            # invalid JSON
    ("/v1/completions", b'{"prompt": "\xff\xfe caf\xe9", "max_tokens": 2}', 400, None),  # invalid UTF-8
    ("/v1/completions", b'{"prompt": "\\ud800 x", "max_tokens": 2}', 400, "prompt"),   # lone surrogate
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages"),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"", 400, "any"),
    ("/v1/completions", json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "x", "n": "two"}).encode(), 400, "n"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 1.5}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": {"a": 1}}).encode(), 400, "stop"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10 ** 30}).encode(), 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                         "max_completion_tokens": 0}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "x", "n": 10 ** 9, "temperature": 1}).encode(), 400, "n"),
    ("/v1/completions", json.dumps({"prompt": "x", "n": 0}).encode(), 400, "n"),
    ("/v1/completions", json.dumps({"prompt": "x", "seed": 2 ** 64}).encode(), 400, "seed"),
    ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 10 ** 6}).encode(), 400, "logprobs"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", json.dumps({"prompt": []}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": [[]]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": [5, -1]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": [10 ** 30]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "llama " * 400}).encode(), 400, "input_tokens"),
    ("/v1/completions", json.dumps({"prompt": list(range(3, 3 + MAX_MODEL_LEN))}).encode(), 400, "input_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"content": "x"}]}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": 7, "content": "x"}]}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [{"type": "x"}]}]}).encode(),
     400, "any"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                         "model": "nope"}).encode(), 404, "model"),
    ("/tokenize", json.dumps({"prompt": "x", "messages": []}).encode(), 400, "prompt"),
    ("/detokenize", json.dumps({"tokens": [-5]}).encode(), 400, "tokens"),
]


def test_bad_inputs_get_openai_errors(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        for path, body, status, param in BAD_INPUTS:
            r = http.post(path, content=body, headers=JSON)
            assert_openai_error(r, status, param)
        assert_openai_error(http.get("/v1/no-such-route"), 404)
        assert_openai_error(http.get("/v1/completions"), 405)
        assert_openai_error(http.post("/v1/completions", content=b'{"prompt": "x"}',
                                      headers={"content-type": "text/plain"}), 400)
        # Unknown roles are rendered by the chat template, as vLLM does; the reply is well-formed.
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}],
                                                    "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert http.get("/health").status_code == 200
    idle_state(server)


def test_request_body_limit(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        big = json.dumps({"prompt": "x" * (BODY_LIMIT + 10)}).encode()
        err = assert_openai_error(http.post("/v1/completions", content=big, headers=JSON), 413)
        assert "--max-request-body-bytes" in err["message"]
        assert_openai_error(http.post("/tokenize", content=big, headers=JSON), 413)  # unguarded paths too

        def chunks():  # no Content-Length: the limit counts the bytes as they arrive
            for _ in range(BODY_LIMIT // 4096 + 2):
                yield b" " * 4096
        assert_openai_error(http.post("/v1/completions", content=chunks(), headers=JSON), 413)
        # Just under the limit the body is read and judged on its content (too long for the model).
        near = json.dumps({"prompt": "llama " * ((BODY_LIMIT - 100) // 6)}).encode()
        assert len(near) <= BODY_LIMIT
        assert_openai_error(http.post("/v1/completions", content=near, headers=JSON), 400, "input_tokens")
    # Without the key, a large body is refused before it is read.
    r = httpx.post(server.url + "/v1/completions", content=big, headers=JSON, timeout=60)
    assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}


def test_api_key_guards_v1_only(server):
    open_paths = ["/health", "/metrics", "/version", "/ping"]
    for path in open_paths:
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"},
                    {"Authorization": f"Bearer {API_KEY[:-1]}"}, {"X-API-Key": API_KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}, headers
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                       headers=headers, timeout=30)
        assert r.status_code == 401, headers
    assert httpx.get(server.url + "/v1/models", headers=AUTH, timeout=30).status_code == 200
    # the scheme is case-insensitive (RFC 9110), as clients send it either way
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {API_KEY}"},
                     timeout=30).status_code == 200
    # Spellings that must not reach a guarded route without the key (raw request targets).
    for target in ("/v1/models", "//v1/models", "/V1/models", "/%76%31/models", "/v1/models?x=/health",
                   "/health/../v1/models", "/v1/./models"):
        status = _raw_get(server.port, target)
        assert status in (401, 404), (target, status)


def _raw_get(port: int, target: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_api_key_compare_is_constant_time(monkeypatch):
    """The key check goes through secrets.compare_digest (no early exit on the first wrong byte)."""
    import herd.server.app as app_module

    calls = []
    real = app_module.secrets.compare_digest
    monkeypatch.setattr(app_module.secrets, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = app_module.APIKeyMiddleware(inner, "k3y")

    async def call(path, auth):
        sent = []
        headers = [(b"authorization", auth)] if auth is not None else []

        async def send(m):
            sent.append(m)
        await mw({"type": "http", "method": "GET", "path": path, "headers": headers}, None, send)
        return sent[0]["status"]

    assert asyncio.run(call("/v1/models", b"Bearer k3y")) == 204
    assert asyncio.run(call("/v1/models", b"Bearer k3x")) == 401
    assert asyncio.run(call("/v1/models", None)) == 401
    assert calls == [(b"k3y", b"k3y"), (b"k3x", b"k3y")]  # the token, whatever its first wrong byte
    assert asyncio.run(call("/health", None)) == 204 and len(calls) == 2  # not guarded, not compared
    assert seen == ["/v1/models", "/health"]


# -- load ----------------------------------------------------------------------------------------

def test_small_load_run(server):
    """The CI-sized run of scripts/load_test.py: mixed requests, 10% disconnects, a tiny KV pool."""
    lt = load_script("load_test")
    pool = lt.greedy_pool(6, 10, seed=0)
    specs = lt.make_workload(200, 0, MODEL, MAX_MODEL_LEN, pool=pool, max_words=10, max_tokens=24,
                             greedy_max_tokens=24)
    report = asyncio.run(lt.run_load(server.url, specs, 32, API_KEY, pool=pool, greedy_max_tokens=24, model=MODEL,
                                     max_seconds=300, progress=False))
    assert report["failures"] == [] and report["num_5xx"] == 0, report
    assert report["idle_after"] and report["healthy_after"], report["engine_after"]
    assert report["categories"]["disconnected"] >= 10 and report["categories"]["refused"] >= 1
    assert report["categories"]["ok"] + report["categories"].get("ok-near-tie", 0) >= 150
    assert report["greedy_checked"] >= 20 and report["preemptions"] > 0  # the pool was too small
    assert report["passed"]


def test_load_checks_catch_wrong_outputs():
    """The load test's verdicts are not vacuous."""
    lt = load_script("load_test")
    spec = lt.Spec(0, "completion", {}, True, 2, 4, True)
    good = lt.Result(spec, 200, texts={0: "a", 1: "b"}, finish={0: ["length"], 1: ["length"]},
                     usage={"prompt_tokens": 3, "completion_tokens": 8}, done=True)
    assert lt.check(good, {}) == ("ok", [])
    for change in ({"done": False}, {"finish": {0: ["length"]}}, {"finish": {0: ["length"], 1: ["stop"]}},
                   {"usage": {"prompt_tokens": 3, "completion_tokens": 7}}, {"status": 500}):
        assert lt.check(lt.Result(**{**good.__dict__, **change}), {})[0] == "failed", change
    greedy = lt.Spec(1, "chat", {}, False, 1, 3, True, greedy_key=("chat", 0))
    refs = {("chat", 0): ([5, 6, 7, 8], [1.0, 5e-4, 1.0, 1.0])}
    res = lt.Result(greedy, 200, tokens={0: [5, 6, 7]}, finish={0: ["length"]},
                    usage={"prompt_tokens": 3, "completion_tokens": 3})
    assert lt.check(res, refs)[0] == "ok"
    res.tokens = {0: [5, 9, 1]}   # departs at a near-tie (gap 5e-4)
    assert lt.check(res, refs)[0] == "ok-near-tie"
    res.tokens = {0: [9, 6, 7]}   # departs where the reference was clear
    assert lt.check(res, refs)[0] == "failed"


# -- preemption ----------------------------------------------------------------------------------

def _generate_bounded(llm, prompts, params, max_steps: int = 2000):
    """LLM.generate with a step bound, so a scheduler that stops making progress fails the test."""
    engine = llm.llm_engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return [finished[str(i)] for i in range(len(prompts))]
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    sched = engine.scheduler
    raise AssertionError(f"no progress after {max_steps} steps: {len(sched.running)} running, "
                         f"{len(sched.waiting)} waiting, free blocks {engine.block_manager.num_free_blocks()}")


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_gives_unconstrained_outputs(scout_dir, prefix_caching):
    """A KV pool too small for the batch preempts and recomputes; greedy and seeded outputs match
    a run with room for everything."""
    from herd.engine.llm import LLM
    from herd.engine.sampling_params import SamplingParams

    lens = [3, 9, 17, 30, 5, 41, 12, 24]
    prompts = [{"prompt_token_ids": [1] + [(7 * i + 3 * j) % 300 + 6 for j in range(n)]} for i, n in enumerate(lens)]
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(temperature=0.9, n=2, seed=11, max_tokens=40, ignore_eos=True)
    params = [greedy] * 6 + [seeded] * 2
    outs = {}
    for name, blocks in (("roomy", 512), ("tight", 24)):
        llm = LLM(scout_dir, dtype="float32", device="cpu", block_size=4, num_kv_blocks=blocks, max_model_len=96,
                  seed=0, enable_prefix_caching=prefix_caching)
        try:
            outs[name] = _generate_bounded(llm, prompts, params)
            outs[name + "_preemptions"] = llm.llm_engine.scheduler.num_preemptions
            assert llm.llm_engine.block_manager.num_free_blocks() == llm.llm_engine.num_blocks
        finally:
            llm.llm_engine.shutdown()
    assert outs["roomy_preemptions"] == 0 and outs["tight_preemptions"] >= 3
    for ref, got in zip(outs["roomy"], outs["tight"]):
        for r, g in zip(ref.outputs, got.outputs):
            assert len(g.token_ids) == 40
            if r.logprobs is None:  # seeded sampling: the per-request generator continues
                assert g.token_ids == r.token_ids
                continue
            for pos, (a, b) in enumerate(zip(r.token_ids, g.token_ids)):
                if a != b:  # only where the reference's top two are within float rounding
                    top = sorted((lp.logprob for lp in r.logprobs[pos].values()), reverse=True)
                    assert top[0] - top[1] < 1e-3, (pos, a, b, top)
                    break


# -- step failures -------------------------------------------------------------------------------

POISON = 299  # a prompt token that makes the (patched) executor raise


def _engine_app(scout_dir, **flags):
    from herd.config import EngineConfig
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.server.app import build_app

    engine = AsyncLLMEngine(EngineConfig.from_kwargs(scout_dir, dtype="float32", block_size=4, num_kv_blocks=64,
                                                     max_model_len=MAX_MODEL_LEN, device="cpu", **flags))
    return engine, build_app(engine, SimpleNamespace(served_model_name=["m"]))


def _poison_executor(engine, sticky: bool = False, skip_probe: bool = False):
    """Make engine steps raise while a poisoned prompt is in the batch (`sticky`: from then on,
    including the probe; `skip_probe`: raise on every step except the probe)."""
    executor = engine.engine.executor
    real = executor.execute
    state = {"broken": False, "calls": 0}

    def execute(batch):
        state["calls"] += 1
        probe = all(s.request_id == "herd-probe" for s in batch.seqs)
        if skip_probe and not probe:
            raise RuntimeError("injected failure")
        if any(POISON in s.prompt_token_ids for s in batch.seqs):
            state["broken"] = sticky
            raise RuntimeError("injected failure")
        if state["broken"]:
            raise RuntimeError("device lost")
        return real(batch)

    executor.execute = execute
    return state


async def _post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))


def _completion(prompt, n=8, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True, **kw}


def test_step_failure_fails_only_its_requests(scout_dir):
    engine, app = _engine_app(scout_dir, max_num_seqs=1)  # one sequence per step: a batch is one request
    try:
        _poison_executor(engine)
        good = [_completion([1, 10 + i, 20 + i], 6) for i in range(3)]
        bad = _completion([1, POISON, 5], 6)
        stream_good, stream_bad = {**good[0], "stream": True}, {**bad, "stream": True}
        rs = asyncio.run(_post_all(app, [good[0], bad, good[1], stream_good, good[2], stream_bad]))
        err = assert_openai_error(rs[1], 500)
        assert err["type"] == "InternalServerError" and "aborted" in err["message"]
        assert "injected failure" not in err["message"]  # internals stay in the server log
        for r in (rs[0], rs[2], rs[4]):
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        assert rs[3].status_code == 200 and rs[3].text.endswith("data: [DONE]\n\n") and '"error"' not in rs[3].text
        # A stream has sent its 200 already: the error comes as the last chunk before [DONE].
        events = [e for e in rs[5].text.split("\n\n") if e]
        assert rs[5].status_code == 200 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == 500
        assert engine.is_running and engine.num_step_failures == 2

        # With several requests per step, the poisoned step takes its co-runners down with it.
        engine.engine.scheduler.max_num_seqs = 8
        rs = asyncio.run(_post_all(app, [_completion([1, 30, 31], 40), _completion([1, 32, POISON], 4)]))
        assert all(r.status_code == 500 for r in rs)
        assert engine.is_running and engine.num_step_failures == 3
        r = asyncio.run(_post_all(app, [good[1]]))[0]  # the engine goes on serving
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        stats = engine.get_stats()
        assert stats.num_running == stats.num_waiting == 0
        assert stats.free_blocks == engine.engine.num_blocks
        from fastapi.testclient import TestClient
        assert TestClient(app).get("/health").status_code == 200
    finally:
        engine.shutdown()


def test_engine_dies_when_the_probe_fails(scout_dir):
    from fastapi.testclient import TestClient

    engine, app = _engine_app(scout_dir)
    try:
        _poison_executor(engine, sticky=True)
        r = asyncio.run(_post_all(app, [_completion([1, POISON], 4)]))[0]
        assert "engine has stopped" in assert_openai_error(r, 500)["message"]
        # The caller hears of the failure only after the verdict: never a 200 /health in between.
        assert not engine.is_running and engine.errored is not None
        http = TestClient(app)
        assert http.get("/health").status_code == 503
        err = assert_openai_error(http.post("/v1/completions", json=_completion("hello", 2)), 500)
        assert "engine has stopped" in err["message"]
    finally:
        engine.shutdown()


def test_engine_dies_after_repeated_step_failures(scout_dir):
    engine, app = _engine_app(scout_dir)
    try:
        _poison_executor(engine, skip_probe=True)  # the probe passes, every real step fails
        for i in range(engine.max_step_failures):
            assert engine.is_running
            r = asyncio.run(_post_all(app, [_completion([1, 40 + i], 3)]))[0]
            assert_openai_error(r, 500)
        assert not engine.is_running and engine.num_step_failures == engine.max_step_failures
    finally:
        engine.shutdown()


def test_engine_that_schedules_nothing_does_not_spin(scout_dir, caplog):
    from herd.engine.async_engine import AsyncLLMEngine
    from herd.engine.sampling_params import SamplingParams

    engine, _ = _engine_app(scout_dir)
    try:
        calls = []
        engine.engine.step = lambda: calls.append(1) or []  # a request that never gets scheduled
        engine._note_stall = functools.partial(AsyncLLMEngine._note_stall, engine, report_after=0.2)

        async def stuck():
            stream = engine.generate([1, 5, 6], SamplingParams(max_tokens=2), "stuck")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(stream.__anext__(), 0.8)
            await stream.aclose()

        with caplog.at_level(logging.ERROR, logger="herd.engine.async_engine"):
            asyncio.run(stuck())
        assert 5 <= len(calls) <= 150  # backs off ~10 ms per empty step instead of spinning
        assert "scheduled nothing" in caplog.text and "1 request(s) unfinished" in caplog.text
    finally:
        engine.shutdown()


# -- processes: dead engine exit status, SIGTERM drain -------------------------------------------

# Wraps `herd serve`: an executor that raises on a poisoned prompt (and then forever), and an
# optional delay per step so that requests are surely in flight when a signal arrives.
_WRAPPER = """
import sys, time
from herd.parallel import executor as ex
real, state = ex.UniProcExecutor.execute, {"broken": False}
delay = float(sys.argv.pop(1))
def execute(self, batch):
    if any(%d in s.prompt_token_ids for s in batch.seqs):
        state["broken"] = True
    if state["broken"]:
        raise RuntimeError("device lost (injected)")
    time.sleep(delay)
    return real(self, batch)
ex.UniProcExecutor.execute = execute
from herd.cli import main
sys.exit(main(sys.argv[1:]))
""" % POISON


class WrappedServer(RemoteServer):
    """RemoteServer running `herd serve` under _WRAPPER. In process (--disable-frontend-multiprocessing):
    the patched executor exists only in this process; a spawned engine core would run the real one."""

    def __init__(self, model: str, args: list[str], step_delay: float = 0.0, timeout: float = 120.0):
        self.port, self.api_key = free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", _WRAPPER, str(step_delay), "serve", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--disable-frontend-multiprocessing", *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env.pop("HERD_API_KEY", None)
        env.pop("VLLM_API_KEY", None)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="herd-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait(timeout)


def test_dead_engine_exits_nonzero(scout_dir):
    srv = WrappedServer(scout_dir, SERVER_ARGS)
    try:
        if os.path.isdir("/proc"):
            assert spawned_children(srv.proc.pid) == []  # no engine core process
        r = httpx.post(srv.url + "/v1/completions", json=_completion([1, POISON, 4], 4), timeout=60)
        assert_openai_error(r, 500)
        assert srv.proc.wait(60) == 1
        log = srv.read_log()
        assert "device lost (injected)" in log and "the engine has stopped" in log
        assert "engine in the API server process (--disable-frontend-multiprocessing)" in log
        assert "EngineCore_0" not in log  # no engine core process logged anything
    finally:
        srv.stop()


def _stream_lines(url: str, body: dict, out: dict, started: threading.Event):
    """Read one SSE stream to its end (or until the connection drops) into out."""
    lines = []
    out["lines"] = lines
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
    except httpx.HTTPError as e:
        out["error"] = repr(e)
    started.set()


def test_sigterm_drains_in_flight_requests(scout_dir):
    """SIGTERM: no new connections; streams that fit in --shutdown-timeout finish, longer ones are
    cut when it runs out; the process exits 0."""
    srv = WrappedServer(scout_dir, [*SERVER_ARGS, "--shutdown-timeout", "4"], step_delay=0.05)
    try:
        body = _completion("The herd", 40, stream=True, stream_options={"include_usage": True})
        long_body = _completion("The herd", 120, stream=True)   # 120 steps of >= 50 ms: > 4 s
        short, long_, s1, s2 = {}, {}, threading.Event(), threading.Event()
        threads = [threading.Thread(target=_stream_lines, args=(srv.url, body, short, s1)),
                   threading.Thread(target=_stream_lines, args=(srv.url, long_body, long_, s2))]
        for t in threads:
            t.start()
        assert s1.wait(60) and s2.wait(60)
        assert httpx.get(srv.url + "/load", timeout=10).json()["server_load"] == 2  # both in flight
        t_signal = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        refused = False
        while time.monotonic() < deadline and not refused:  # the listening socket closes
            try:
                httpx.get(srv.url + "/health", timeout=2)
                time.sleep(0.05)
            except httpx.ConnectError:
                refused = True
        assert refused
        for t in threads:
            t.join(60)
        assert srv.proc.wait(60) == 0
        assert time.monotonic() - t_signal < 30
        assert short["status"] == 200 and short["lines"][-1] == "data: [DONE]"
        usage = json.loads(short["lines"][-2][6:])["usage"]
        assert usage["completion_tokens"] == 40
        assert long_["lines"][-1] != "data: [DONE]"   # cut off by the shutdown timeout
        assert "timeout graceful shutdown exceeded" in srv.read_log()
    finally:
        srv.stop()


# -- media (image URLs) ---------------------------------------------------------------------------

def _png(w=8, h=8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any connection attempt; DNS answers from a fixed table."""
    table = {"localhost": "127.0.0.1", "intranet.example": "10.1.2.3", "rebind.example": "93.184.216.34",
             "metadata.example": "169.254.169.254"}

    def getaddrinfo(host, port, *a, **k):
        addrs = [table.get(host, host)] + (["192.168.0.7"] if host == "rebind.example" else [])
        fam = [(socket.AF_INET6 if ":" in a_ else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a_, port))
               for a_ in addrs]
        return fam

    def connect(*a, **k):
        raise AssertionError(f"a connection was attempted: {a}")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", connect)


def test_remote_images_are_off_by_default(no_network):
    from herd.multimodal.media import MediaConnector, MediaError

    for url in ("http://93.184.216.34/cat.png", "https://example.com/cat.png"):
        with pytest.raises(MediaError, match="disabled"):
            MediaConnector().load_image(url)


def test_remote_images_refuse_private_and_loopback_addresses(no_network):
    from herd.multimodal.media import MediaConnector, MediaError

    m = MediaConnector(allow_remote=True)
    for host in ("127.0.0.1", "localhost", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                 "metadata.example", "intranet.example", "rebind.example", "0.0.0.0", "100.64.0.1",
                 "[::1]", "[::ffff:127.0.0.1]", "[fd00::1]", "[fe80::1]"):
        with pytest.raises(MediaError, match="non-public address"):
            m.load_image(f"http://{host}:8080/x.png")


def test_local_media_only_under_the_allowed_path(tmp_path):
    from herd.multimodal.media import MediaConnector, MediaError

    root = tmp_path / "media"
    root.mkdir()
    (root / "ok.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(MediaError, match="disabled"):
        MediaConnector().load_image(f"file://{root}/ok.png")
    m = MediaConnector(allowed_local_media_path=str(root))
    assert m.load_image(f"file://{root}/ok.png").size == (8, 8)
    for url in (f"file://{root}/../secret.png", f"file://{root}/link.png", f"file://{root}/%2e%2e/secret.png",
                "file:///etc/passwd"):
        with pytest.raises(MediaError, match="outside the allowed"):
            m.load_image(url)


def test_corrupt_images_are_refused():
    from herd.multimodal.media import MediaConnector, MediaError

    m = MediaConnector(max_image_pixels=10_000)

    def data_url(b: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(b).decode()

    png = _png(64, 64)
    for payload, why in ((png[:60], "corrupt or truncated"), (png[:40], "accepted format"),
                         (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "corrupt|accepted format"),
                         (b"GIF89a" + b"\xff" * 30, "corrupt|accepted format"), (b"", "empty"),
                         (random.Random(0).randbytes(300), "accepted format"), (_png(200, 200), "pixels")):
        with pytest.raises(MediaError, match=why):
            m.load_image(data_url(payload))
    with pytest.raises(MediaError, match="base64"):
        m.load_image("data:image/png;base64,%%%")
    assert issubclass(MediaError, ValueError)  # the server maps it to a 400


# -- calibration pickles --------------------------------------------------------------------------

def test_calibration_pickles_load_only_from_the_given_path_with_a_warning(tmp_path, monkeypatch):
    from herd.quant.inc.calibrate import load_dataset

    rows = [{"system_prompt": "s", "question": "q"}]
    pkl = tmp_path / "calib.pkl"
    pkl.write_bytes(pickle.dumps(rows))
    with pytest.warns(UserWarning, match=r"pickle.*arbitrary code.*trust"):
        assert load_dataset(pkl) == rows

    # Next to a pickle, a JSON Lines dataset is read without unpickling anything.
    def no_pickle(*a, **k):
        raise AssertionError("pickle.load was called")
    monkeypatch.setattr(pickle, "load", no_pickle)
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset(jsonl) == rows
    for implicit in (tmp_path, tmp_path / "calib"):  # a folder or a bare stem is not searched for pickles
        with pytest.raises((FileNotFoundError, ValueError)):
            load_dataset(implicit)
