"""The engine core in its own process: wire format, output processing in the front end, the busy
loop's overlap, data-parallel load balancing, and `herd serve`'s layouts: the engine core process
by default (with a dead engine core, and with several API servers), in process when asked or when
the process cannot start. (Every server suite runs against the default layout; with
HERD_TEST_SERVER_ARGS=--disable-frontend-multiprocessing against the in-process one.)"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import zmq

from herd.engine.outputs import Logprob, RequestMetrics
from herd.engine.sampling_params import SamplingParams, SamplingParamsError
from tests.server_utils import REPO, RemoteServer, server_env, spawned_children

ENGINE_KW = dict(dtype="float32", block_size=4, num_kv_blocks=128, max_model_len=128, device="cpu")
SERVER_ARGS = ["--dtype", "float32", "--device", "cpu", "--block-size", "4", "--num-kv-blocks", "128",
               "--max-model-len", "128", "--served-model-name", "tiny", "--disable-log-requests",
               "--disable-uvicorn-access-log", "--disable-log-stats"]


# -- wire format ---------------------------------------------------------------------------------

def test_wire_format_round_trips():
    from herd.engine.output_processor import EngineCoreOutput, SeqOutput
    from herd.engine.serial_utils import (decode_error, decode_mm, decode_output, decode_params, encode_error,
                                          encode_mm, encode_output, encode_params, pack_request, packb, unpackb)
    from herd.multimodal.inputs import MultiModalInputs, MultiModalItem

    params = SamplingParams(n=2, temperature=0.7, seed=5, stop=["\n\n", "END"], logit_bias={7: -3.5},
                            logprobs=3, max_tokens=9, structured_outputs={"choice": ["yes", "no"]})
    back = decode_params(unpackb(packb(encode_params(params))))
    for name in ("n", "temperature", "seed", "stop", "logit_bias", "logprobs", "max_tokens"):
        assert getattr(back, name) == getattr(params, name), name
    assert back.structured_outputs.choice == ["yes", "no"]
    bad = SamplingParams()
    bad.stop = [object()]  # nothing that needs Python objects crosses the process boundary
    with pytest.raises(ValueError, match="stop"):
        pack_request("r#0", 0, [1, 2], bad, 0.0, None)
    msg = unpackb(pack_request("r#0", 1, [1, 2], params, 5.0, None))
    assert msg[:4] == ["add", 1, "r#0", [1, 2]] and decode_params(msg[4]).seed == 5 and msg[5:] == [5.0, None]
    # a JSON schema may hold integers beyond 64 bits (msgpack's limit): it travels as JSON text
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 10**30}}}
    msg = unpackb(pack_request("r#1", 0, [1], SamplingParams(structured_outputs={"json": schema}), 0.0, None))
    assert decode_params(msg[4]).structured_outputs.json == schema

    lp = [{5: Logprob(-0.25, 1), 9: Logprob(float("-inf"), 2)}]
    out = EngineCoreOutput("r#0", [SeqOutput(1, [5], lp, -0.25, "stop", 5, True)], [None, {3: Logprob(-1.5, 1)}],
                           RequestMetrics(10.0, 10.5, 11.0, 11.0, 11.0, 1), 8, True)
    got = decode_output(unpackb(packb(encode_output(out))))
    assert got.seqs[0].new_logprobs[0][9].logprob == float("-inf") and got.seqs[0].new_logprobs[0][5].rank == 1
    assert (got.seqs[0].index, got.seqs[0].stop_reason, got.seqs[0].stop_terminated) == (1, 5, True)
    assert got.new_prompt_logprobs[0] is None and got.new_prompt_logprobs[1][3].logprob == -1.5
    assert got.metrics == out.metrics and got.num_cached_tokens == 8 and got.finished

    item = MultiModalItem(torch.randn(2, 3, 4, 4).to(torch.bfloat16), (1, 2), 3,
                          torch.tensor([False, True, True, False]))
    mm = decode_mm(unpackb(packb(encode_mm(MultiModalInputs([item])))))
    assert torch.equal(mm.items[0].pixel_values, item.pixel_values) and mm.items[0].hash == item.hash
    assert torch.equal(mm.items[0].is_embed, item.is_embed) and mm.items[0].aspect_ratio == (1, 2)

    err = decode_error(*unpackb(packb(encode_error(SamplingParamsError("top_p must be in (0, 1]", "top_p")))))
    assert isinstance(err, SamplingParamsError) and err.parameter == "top_p"


def test_stats_of_replicas_add_up():
    from herd.engine.llm_engine import EngineStats
    from herd.engine.serial_utils import encode_stats, merge_stats

    a = EngineStats(2, 1, 0.5, 3, 100, 40, {"full": 10, "local": 4})
    b = EngineStats(1, 0, 0.25, 0, 50, 10, {"full": 6, "local": 8})
    m = merge_stats(EngineStats, [encode_stats(a), encode_stats(b)])
    assert (m.num_running, m.num_waiting, m.num_preemptions, m.prompt_tokens, m.generation_tokens) == (3, 1, 3, 150, 50)
    assert m.kv_cache_usage == pytest.approx(0.375) and m.free_blocks == {"full": 16, "local": 12}


# -- output processing in the front end ----------------------------------------------------------

def test_output_processor_stop_strings_and_late_tokens(scout_dir):
    from herd.engine.output_processor import EngineCoreOutput, OutputProcessor, SeqOutput
    from herd.engine.tokenizer import get_tokenizer

    tok = get_tokenizer(scout_dir)
    ids = tok.encode("hello world and more", add_special_tokens=False)
    stop = tok.decode(ids[1:3])
    op = OutputProcessor(tok)
    op.add_request("r", None, [1], SamplingParams(n=2, temperature=1.0, stop=[stop], max_tokens=20), 1.0)

    def step(i, token, finish=None):
        m = RequestMetrics(1.0, 1.0, 2.0, 2.0 + i, None)
        return [EngineCoreOutput("r", [SeqOutput(0, [token]), SeqOutput(1, [token], finish_reason=finish)],
                                 metrics=m)]

    outs, stops = op.process_outputs(step(0, ids[0]))
    assert stops == [] and not outs[0].finished
    outs, stops = op.process_outputs(step(1, ids[1]))
    outs, stops = op.process_outputs(step(2, ids[2]))
    # both sequences hit the stop string here; the core still runs both and must be told
    assert stops == [("r", 0, stop), ("r", 1, stop)]
    o = outs[0]
    assert o.finished and [c.finish_reason for c in o.outputs] == ["stop", "stop"]
    assert o.outputs[0].stop_reason == stop and o.outputs[0].text == tok.decode(ids[:1])
    assert o.metrics.finished_time == o.metrics.last_token_time
    assert op.process_outputs(step(3, ids[3]))[0] == []  # the core ran ahead: dropped
    assert len(op) == 0


# -- the busy loop: step N+1 runs while step N's outputs go out ----------------------------------

def test_engine_core_sends_outputs_while_the_next_step_runs(scout_dir, tmp_path):
    from herd.config import EngineConfig
    from herd.engine.core import EngineCoreProc
    from herd.engine.serial_utils import pack_request, unpackb

    in_addr, out_addr = f"ipc://{tmp_path}/core", f"ipc://{tmp_path}/client"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(out_addr)
    core = EngineCoreProc(EngineConfig.from_kwargs(scout_dir, **ENGINE_KW), 0, in_addr, [out_addr])
    tokens_seen = [0]
    got = threading.Condition()
    stalled = []
    real = core.engine.executor.execute

    def execute(batch):
        # Step k (k >= 1) waits here until the client holds step k-1's token: only a loop that
        # sends outputs while the next step runs gets past this.
        k = execute.calls
        execute.calls += 1
        with got:
            if not got.wait_for(lambda: tokens_seen[0] >= k, timeout=10):
                stalled.append(k)
        return real(batch)

    execute.calls = 0
    core.engine.executor.execute = execute
    loop = threading.Thread(target=core.run_busy_loop)
    loop.start()
    push = ctx.socket(zmq.PUSH)
    push.connect(in_addr)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    push.send(pack_request("r#0", 0, [1, 20, 30], params, time.time(), None))
    finished = False
    try:
        while not finished:
            assert pull.poll(30000), "no output from the engine core"
            msg = unpackb(pull.recv())
            if msg[0] != "out":
                continue
            for o in msg[2]:
                with got:
                    tokens_seen[0] += len(o[1][0][1])
                    got.notify_all()
                finished = finished or o[5]
    finally:
        core.stop()
        loop.join(30)
        core.shutdown()
        for s in (pull, push):
            s.close(linger=0)
        ctx.term()
    assert tokens_seen[0] == 6 and execute.calls == 6 and stalled == []


def test_shutdown_while_an_engine_core_starts_does_not_wait_for_it(scout_dir):
    # Ctrl-C while the model loads: the core reads its pipe only once it is ready, so it is killed
    # at once rather than waited for (a large model loads for minutes).
    from herd.config import EngineConfig
    from herd.engine.core_procs import EngineCoreProcs

    procs = EngineCoreProcs(dp_size=1)
    procs.start(EngineConfig.from_kwargs(scout_dir, **ENGINE_KW))
    proc = procs.procs[0]
    procs.shutdown()  # before wait_ready: still importing or loading
    assert not proc.is_alive() and proc.exitcode == -signal.SIGKILL
    assert not os.path.exists(procs.ipc_dir)


def test_engine_core_dying_while_it_loads_is_one_clear_error(scout_dir):
    from herd.config import EngineConfig
    from herd.engine.core_procs import EngineCoreDied, EngineCoreProcs

    procs = EngineCoreProcs(dp_size=1)
    procs.start(EngineConfig.from_kwargs(scout_dir, **ENGINE_KW))
    assert procs.conns[0].poll(60)  # it has started (its first message waits, unread)
    os.kill(procs.procs[0].pid, signal.SIGKILL)  # as the out-of-memory killer would
    with pytest.raises(EngineCoreDied, match=r"engine core 0 \(pid \d+\) died while starting \(killed by SIGKILL\)"
                       r"; the system may have run out of memory"):
        procs.wait_ready()
    assert not os.path.exists(procs.ipc_dir)


# -- data parallel -------------------------------------------------------------------------------

def test_balancer_prefers_short_queues_and_cached_prefixes():
    from herd.engine.dp import DPLoadBalancer

    lb = DPLoadBalancer(2, block_size=4, slack=8)
    prefix = list(range(100, 116))
    assert lb.choose(prefix + [1]) == 0
    assert lb.choose([7, 8, 9, 10, 11]) == 1              # core 0 has one waiting now
    lb.update(0, num_running=3, num_waiting=0)
    lb.update(1, num_running=0, num_waiting=0)
    assert lb.choose(prefix + [2]) == 0                    # its blocks are cached on core 0, which is not too busy
    lb.update(0, num_running=3, num_waiting=5)
    assert lb.choose(prefix + [3]) == 1                    # too busy now: the prefix moves
    assert lb.choose(prefix + [4]) == 1                    # and follows it
    assert lb.choose([1, 2, 3]) == 1                       # no full block: load only
    assert DPLoadBalancer(1, 4).choose(prefix) == 0


def test_data_parallel_replicas_share_the_work(scout_dir):
    from herd import LLM
    from herd.config import EngineConfig
    from herd.engine.core_client import AsyncLLM

    engine = AsyncLLM.launch(EngineConfig.from_kwargs(scout_dir, **ENGINE_KW), data_parallel_size=2)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = [[1, 10 + i, 20 + i, 30 + i] for i in range(6)]

    async def run(prompt, rid, params=greedy):
        last = None
        async for out in engine.generate(prompt, params, rid):
            last = out
        return last

    async def main():
        outs = await asyncio.gather(*[run(p, f"r{i}") for i, p in enumerate(prompts)])
        # prefix affinity: A's blocks stay on its core; B (same 16-token prefix) follows them
        # there although the other core is idle, and finds them in that core's prefix cache.
        # (Idle cores tie; the first takes A, then the busy request.)
        shared = list(range(40, 56))
        await asyncio.sleep(0.5)  # the cores' stats settle
        a = await run(shared + [60], "a")
        await asyncio.sleep(0.5)
        long = asyncio.create_task(run([1, 2, 3], "busy", SamplingParams(max_tokens=100, temperature=0.0,
                                                                         ignore_eos=True)))
        await asyncio.sleep(0.5)
        b = await run(shared + [61], "b")
        await long
        return outs, a, b

    try:
        outs, a, b = asyncio.run(main())
        per_core = [s.generation_tokens for s in engine.core_stats()]
        assert engine.get_stats().generation_tokens == sum(per_core)
    finally:
        engine.shutdown()
    assert all(n >= 12 for n in per_core[:2]), per_core  # both replicas decoded some of the 6 requests
    assert b.num_cached_tokens >= 12 and a.num_cached_tokens == 0
    ref = LLM(scout_dir, **ENGINE_KW).generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    for got, want in zip(outs, ref):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
        for g, w in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert g.keys() == w.keys() and all(g[t].decoded_token == w[t].decoded_token for t in g)
            assert [g[t].logprob for t in g] == pytest.approx([w[t].logprob for t in w], abs=1e-4)


# -- `herd serve`: engine core processes by default ----------------------------------------------

def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_layout_flags_and_environment(monkeypatch):
    from herd.cli import build_parser
    from herd.server.cli import frontend_multiprocessing

    def layout(*flags, **env):
        for name in ("HERD_ENABLE_MULTIPROCESSING", "VLLM_ENABLE_V1_MULTIPROCESSING"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        argv = ["serve", "m", *flags]
        return frontend_multiprocessing(build_parser(argv).parse_args(argv))

    assert layout() == (True, "default")
    assert layout("--frontend-multiprocessing") == (True, "--frontend-multiprocessing")
    assert layout("--disable-frontend-multiprocessing") == (False, "--disable-frontend-multiprocessing")
    assert layout("--disable_frontend_multiprocessing")[0] is False
    assert layout("--no-frontend-multiprocessing") == (False, "--no-frontend-multiprocessing")
    assert layout(VLLM_ENABLE_V1_MULTIPROCESSING="0") == (False, "$VLLM_ENABLE_V1_MULTIPROCESSING=0")
    assert layout(HERD_ENABLE_MULTIPROCESSING="false", VLLM_ENABLE_V1_MULTIPROCESSING="1") == (
        False, "$HERD_ENABLE_MULTIPROCESSING=0")  # herd's name first
    assert layout(HERD_ENABLE_MULTIPROCESSING="1") == (True, "$HERD_ENABLE_MULTIPROCESSING=1")
    assert layout("--frontend-multiprocessing", VLLM_ENABLE_V1_MULTIPROCESSING="0")[0] is True  # a flag wins
    assert layout("-dp", "2", VLLM_ENABLE_V1_MULTIPROCESSING="0") == (True, "--data-parallel-size")
    assert layout("--api-server-count", "2") == (True, "--api-server-count")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        layout(VLLM_ENABLE_V1_MULTIPROCESSING="maybe")
    with pytest.raises(ValueError, match="contradict"):
        layout("--frontend-multiprocessing", "--disable-frontend-multiprocessing")
    with pytest.raises(ValueError, match="drop --disable-frontend-multiprocessing"):
        layout("-dp", "2", "--disable-frontend-multiprocessing")


def _complete(srv, n=4) -> int:
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": [1, 5, 6], "max_tokens": n,
                                                      "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["completion_tokens"]


def test_dead_engine_core_fails_requests_and_the_server(scout_dir):
    """A plain `herd serve` (no layout flag) runs its engine core in a process of its own; when
    that process is killed, the stream in flight ends with an error, /health answers 503 and the
    server exits with status 1."""
    # a long context, so that the stream is surely still running when the core is killed
    args = [*SERVER_ARGS, "--max-model-len", "512", "--num-kv-blocks", "160"]
    srv = RemoteServer(scout_dir, args, suite_args=False)
    try:
        body = {"model": "tiny", "prompt": [1, 5, 6], "max_tokens": 500, "ignore_eos": True, "stream": True}
        assert _complete(srv) == 4
        cores = spawned_children(srv.proc.pid)
        assert len(cores) == 1
        log = srv.read_log()
        assert f"engine core process: pid {cores[0]} (the default;" in log
        assert "EngineCore_0 herd.engine.llm_engine: KV cache" in log  # the model loaded there
        lines, started = [], threading.Event()

        def stream():
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        os.kill(cores[0], signal.SIGKILL)
        reader.join(60)
        assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2] and '"code": 500' in lines[-2]
        try:  # /health says so until the server is gone
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        except httpx.ConnectError:
            pass
        assert srv.proc.wait(60) == 1
        log = srv.read_log()
        assert f"engine core 0 (pid {cores[0]}) died unexpectedly" in log
    finally:
        srv.stop()


def test_several_api_servers_share_one_engine_core(scout_dir):
    srv = RemoteServer(scout_dir, [*SERVER_ARGS, "--api-server-count", "2"], timeout=180, suite_args=False)
    try:
        kids = spawned_children(srv.proc.pid)
        assert len(kids) == 3  # two API servers and the engine core
        deadline = time.time() + 120  # /health answered from the first API server that was up
        while not all(f"APIServer_{i} herd.serve: serving" in srv.read_log() for i in (0, 1)):
            assert time.time() < deadline, srv.read_log()
            time.sleep(0.2)

        def one(i):
            with httpx.Client(timeout=60) as c:  # a connection of its own: either API server may take it
                r = c.post(srv.url + "/v1/completions",
                           json={"model": "tiny", "prompt": [1, 7, i], "max_tokens": 5, "ignore_eos": True,
                                 "temperature": 0.0})
                return r.status_code, r.json()["usage"]["completion_tokens"]

        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(one(i))) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == [(200, 5)] * 12
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
        assert not [p for p in kids if _running(p)]  # the API servers and the core are gone too
    finally:
        srv.stop()


def test_in_process_when_asked_by_environment(scout_dir):
    """vLLM's VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine in the API server process."""
    srv = RemoteServer(scout_dir, SERVER_ARGS, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, suite_args=False)
    try:
        assert spawned_children(srv.proc.pid) == []
        assert _complete(srv) == 4
        log = srv.read_log()
        assert "engine in the API server process ($VLLM_ENABLE_V1_MULTIPROCESSING=0)" in log
        assert "EngineCore_0" not in log
    finally:
        srv.stop()


# Starts `herd serve` from a script without the `if __name__ == "__main__":` guard: a spawned process
# re-runs such a script and cannot start; the server then runs in process.
_UNGUARDED = """
import sys
from herd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_server_falls_back_to_in_process_when_no_engine_core_can_start(scout_dir, tmp_path):
    script = tmp_path / "serve_unguarded.py"
    script.write_text(_UNGUARDED)
    srv = RemoteServer(scout_dir, SERVER_ARGS, launcher=[sys.executable, str(script)], suite_args=False)
    try:
        assert _complete(srv) == 4
        assert spawned_children(srv.proc.pid) == []
        log = srv.read_log()
        assert "could not start" in log and "running the engine in the API server process instead" in log
        assert "engine in the API server process (engine core processes are unavailable)" in log
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    # asked for explicitly, the split does not fall back: the server refuses to start
    proc = subprocess.run([sys.executable, str(script), "serve", scout_dir, *SERVER_ARGS, "--port", "1",
                           "--frontend-multiprocessing"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=server_env())
    assert proc.returncode == 2, proc.stderr
    assert "herd serve: error: engine core 0" in proc.stderr and "could not start" in proc.stderr

