"""`herd bench`: serving client against a streaming stub and a real `herd serve`, offline throughput/latency."""
import asyncio
import json
import math
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image

from herd import LLM
from herd.bench.datasets import (HFTokenizer, exact_length_text, jsonl_requests, random_requests,
                                 random_token_requests, sharegpt_requests)
from herd.bench.latency import measure_latency
from herd.bench.metrics import calculate_metrics, format_result
from herd.bench.request import RequestOutput
from herd.bench.serve import arrival_gaps
from herd.bench.throughput import ThroughputResult, run_herd
from herd.cli import main
from tests.server_utils import free_port

TTFT_S, GAP_S = 0.05, 0.02


class Stub:
    """An OpenAI-compatible streaming server on loopback: one character = one token; the first
    chunk after TTFT_S, then one chunk every GAP_S; counts requests in flight."""

    def __init__(self):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import StreamingResponse

        app = FastAPI()
        self.inflight = self.peak = 0
        self.prompts = []

        async def stream(body, chat: bool):
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            try:
                prompt = body["messages"][0]["content"] if chat else body["prompt"]
                self.prompts.append(prompt)
                n = body.get("max_completion_tokens" if chat else "max_tokens")
                await asyncio.sleep(TTFT_S - GAP_S)
                for i in range(n):
                    await asyncio.sleep(GAP_S)
                    choice = {"index": 0, "delta": {"content": "ab"[i % 2]}} if chat else {"index": 0, "text": "ab"[i % 2]}
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                usage = {"prompt_tokens": len(prompt), "completion_tokens": n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.inflight -= 1

        @app.post("/v1/completions")
        async def completions(body: dict):
            return StreamingResponse(stream(body, False), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat(body: dict):
            return StreamingResponse(stream(body, True), media_type="text/event-stream")

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

        @app.post("/tokenize")
        async def tokenize(body: dict):
            return {"tokens": [ord(c) for c in body["prompt"]]}

        @app.post("/detokenize")
        async def detokenize(body: dict):
            return {"prompt": "".join(chr(t) for t in body["tokens"])}

        self.url = f"http://127.0.0.1:{free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise TimeoutError("stub server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def stub():
    s = Stub()
    yield s
    s.stop()


def test_bench_serve_against_stub(stub, tmp_path, capsys):
    rc = main(["bench", "serve", "--base-url", stub.url, "--num-prompts", "6", "--input-len", "20",
               "--output-len", "5", "--max-concurrency", "2", "--save-result", "--result-dir", str(tmp_path),
               "--result-filename", "r.json", "--disable-tqdm", "--metric-percentiles", "50,99"])
    assert rc == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    head = lines.index("============ Serving Benchmark Result ============")
    assert lines[head + 1].split() == ["Successful", "requests:", "6"]
    assert lines[head + 3].startswith("Maximum request concurrency:") and lines[head + 3].split()[-1] == "2"
    for label in ("Request throughput (req/s):", "Output token throughput (tok/s):", "Mean TTFT (ms):",
                  "P99 TPOT (ms):", "P50 ITL (ms):", "Median E2EL (ms):", "Peak concurrent requests:"):
        assert any(line.startswith(label) and line[40] == " " for line in lines), label
    assert lines.index("=" * 50) > head + 20  # the closing rule after the four metric sections

    r = json.loads((tmp_path / "r.json").read_text())
    assert r["model_id"] == "stub-model" and r["completed"] == 6 and r["failed"] == 0
    assert r["total_output_tokens"] == 30
    # prompts were cut to exactly 20 tokens with the server's /tokenize (here: 20 characters)
    assert r["input_lens"] == [20] * 6 and all(len(p) == 20 for p in stub.prompts[-6:])
    assert r["max_concurrent_requests"] == 2 and stub.peak == 2
    assert TTFT_S * 1000 <= r["mean_ttft_ms"] < TTFT_S * 1000 + 500
    assert GAP_S * 1000 * 0.9 <= r["median_itl_ms"] < GAP_S * 1000 + 200
    assert r["mean_tpot_ms"] == pytest.approx(np.mean([(e - t) / 4 for e, t in zip(r["e2els"], r["ttfts"])]) * 1000)
    assert all(len(itl) == 4 for itl in r["itls"])
    # 3 waves of 2 requests: the run takes at least 3 x (TTFT + 4 gaps)
    assert r["duration"] >= 3 * (TTFT_S + 4 * GAP_S)
    assert r["request_throughput"] == pytest.approx(6 / r["duration"])
    for suffix in ("_latency_cdf.png", "_throughput.png"):
        with Image.open(tmp_path / f"r{suffix}") as im:
            assert im.size[0] > 500 and im.size[1] > 300


def test_bench_serve_chat_endpoint_and_rate(stub, tmp_path, capsys):
    rc = main(["bench", "serve", "--base-url", stub.url, "--model", "stub-model", "--endpoint",
               "/v1/chat/completions", "--num-prompts", "4", "--input-len", "8", "--output-len", "3",
               "--request-rate", "40", "--save-result", "--no-plots", "--result-dir", str(tmp_path),
               "--result-filename", "c.json", "--disable-tqdm", "--goodput", "ttft:10000"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Request rate configured (RPS):" in out and "Request goodput (req/s):" in out
    r = json.loads((tmp_path / "c.json").read_text())
    assert r["completed"] == 4 and r["total_output_tokens"] == 12
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # every request met a 10 s TTFT
    assert not (tmp_path / "c_latency_cdf.png").exists()


def test_bench_serve_reports_failures(tmp_path, capsys):
    # nothing listens there: the test request fails and the command says so
    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--model", "m",
               "--num-prompts", "2", "--input-len", "4", "--output-len", "2", "--disable-tqdm"])
    assert rc == 1
    assert "test request failed" in capsys.readouterr().err
    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2"])
    assert rc == 2 and "error:" in capsys.readouterr().err  # no --model and no /v1/models to ask


def test_bench_serve_against_herd_serve(scout_dir, tmp_path, capsys):
    from tests.server_utils import RemoteServer

    server = RemoteServer(scout_dir, ["--max-model-len", "128", "--num-kv-blocks", "64", "--block-size", "8",
                                      "--dtype", "float32", "--served-model-name", "tiny"])
    try:
        rc = main(["bench", "serve", "--base-url", server.url, "--num-prompts", "5", "--input-len", "16",
                   "--output-len", "6", "--ignore-eos", "--max-concurrency", "3", "--save-result",
                   "--result-dir", str(tmp_path), "--result-filename", "h.json", "--disable-tqdm"])
        assert rc == 0, capsys.readouterr().err
        r = json.loads((tmp_path / "h.json").read_text())
    finally:
        server.stop()
    assert r["model_id"] == "tiny" and r["completed"] == 5 and r["failed"] == 0
    assert r["total_output_tokens"] == 30  # ignore_eos: exactly --output-len each
    # 16 text tokens measured with the server's /tokenize, plus the BOS the server adds
    assert r["input_lens"] == [17] * 5
    assert 0 < r["mean_ttft_ms"] <= r["mean_e2el_ms"] and r["mean_tpot_ms"] > 0
    assert 1 <= r["max_concurrent_requests"] <= 3
    assert (tmp_path / "h_throughput.png").stat().st_size > 1000


def _out(start, ttft, latency, tokens, chunks=None):
    chunks = chunks or tokens
    times = [start + ttft + (latency - ttft) * i / max(chunks - 1, 1) for i in range(chunks)]
    return RequestOutput(success=True, prompt_len=10, output_tokens=tokens, ttft=ttft,
                         itl=list(np.diff(times)), latency=latency, start_time=start, chunk_times=times)


def test_metrics_from_known_timings():
    outs = [_out(0.0, 0.05, 1.05, 11), _out(0.5, 0.3, 2.3, 5), _out(3.0, 0.2, 0.2, 1),
            RequestOutput(success=False, error="boom", start_time=0.6, latency=0.1)]
    m = calculate_metrics(outs, duration=4.0, percentiles=[50, 99], goodput_slos={"ttft": 250}, start_time=0.0)
    assert (m.completed, m.failed, m.total_input, m.total_output) == (3, 1, 30, 17)
    assert m.samples["tpot"] == pytest.approx([0.1, 0.5])  # a 1-token request has no TPOT
    assert m.stats_ms["ttft"]["mean"] == pytest.approx(550.0 / 3)
    assert m.stats_ms["e2el"]["median"] == pytest.approx(1050.0)
    assert m.request_throughput == pytest.approx(0.75) and m.output_throughput == pytest.approx(17 / 4)
    assert m.total_token_throughput == pytest.approx(47 / 4)
    assert m.request_goodput == pytest.approx(2 / 4)  # TTFT 0.05 and 0.2 meet 250 ms, 0.3 does not
    assert m.max_concurrent_requests == 3  # all but the last are in flight at 0.65
    # second [0, 1): chunks 0.05..0.95 of the first request and 0.8 of the second
    assert m.max_output_tokens_per_s == pytest.approx(11.0)
    text = format_result(m, None, math.inf, ["ttft", "itl"], [50, 99])
    assert "Maximum request concurrency" not in text and "Request rate configured" not in text
    assert "P50 TTFT (ms):" in text and "TPOT" not in text
    # title, 11 totals (goodput included), 2 metrics x (header, mean, median, p50, p99), closing rule
    assert len(text.splitlines()) == 1 + 11 + 2 * 5 + 1


def test_arrival_gaps_poisson_and_inf():
    assert arrival_gaps(5, math.inf, 1.0, 0) == [0.0] * 5
    gaps = arrival_gaps(4000, 20.0, 1.0, 7)
    assert gaps == arrival_gaps(4000, 20.0, 1.0, 7)  # seeded
    assert np.mean(gaps) == pytest.approx(0.05, rel=0.06)
    assert np.std(gaps) == pytest.approx(0.05, rel=0.1)  # exponential: std = mean
    steady = arrival_gaps(4000, 20.0, 4.0, 7)
    assert np.mean(steady) == pytest.approx(0.05, rel=0.06) and np.std(steady) < 0.6 * np.std(gaps)
    with pytest.raises(ValueError):
        arrival_gaps(3, 0.0, 1.0, 0)


def test_datasets(scout_dir, tmp_path):
    tok = HFTokenizer(scout_dir)
    rng = random.Random(0)
    for n in (1, 7, 33):
        text, got = exact_length_text(n, tok, rng)
        assert got == n and len(tok.encode(text)) == n
    reqs = random_requests(5, 12, 4, 0.5, tok, seed=3)
    assert reqs == random_requests(5, 12, 4, 0.5, tok, seed=3)
    assert all(6 <= r.prompt_len <= 18 and len(tok.encode(r.prompt)) == r.prompt_len for r in reqs)
    assert len({r.prompt for r in reqs}) == 5
    words = random_requests(3, 10, 4)
    assert all(len(r.prompt.split()) == 10 == r.prompt_len for r in words)
    ids = random_token_requests(3, 9, 2, vocab_size=50, skip_ids={0, 1})
    assert all(len(r.prompt) == 9 and not {0, 1} & set(r.prompt) for r in ids)

    share = tmp_path / "sg.json"
    convs = [{"conversations": [{"from": "human", "value": "tell me a story about the fox"},
                                {"from": "gpt", "value": "once upon a time the fox ran away"}]},
             {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "short"}]},
             {"conversations": [{"from": "human", "value": "only one turn"}]}]
    share.write_text(json.dumps(convs))
    got = sharegpt_requests(str(share), 10)
    assert len(got) == 1 and got[0].prompt_len == 7 and got[0].expected_output_len == 8  # words
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a b c", "output_tokens": 3}\n{"prompt": "d e"}\n')
    got = jsonl_requests(str(lines), 3, output_len=9)
    assert [(r.prompt, r.prompt_len, r.expected_output_len) for r in got] == [
        ("a b c", 3, 3), ("d e", 2, 9), ("a b c", 3, 3)]


def test_throughput_and_latency_offline(scout_dir, tmp_path, capsys):
    llm = LLM(scout_dir, dtype="float32", max_model_len=64, num_kv_blocks=32, block_size=8)
    reqs = random_token_requests(4, 10, 6, vocab_size=320, skip_ids=set(range(8)))
    res = run_herd(llm, reqs, use_tqdm=False)
    assert isinstance(res, ThroughputResult)
    j = res.to_json()
    assert (j["num_requests"], j["total_prompt_tokens"], j["total_output_tokens"], j["total_num_tokens"]) == (
        4, 40, 24, 64)
    assert j["elapsed_time"] > 0 and j["output_tokens_per_second"] == pytest.approx(24 / j["elapsed_time"])
    assert res.summary().startswith("Throughput: ")
    lat = measure_latency(llm, batch_size=2, input_len=8, output_len=4, num_iters_warmup=1, num_iters=3)
    assert len(lat["latencies"]) == 3 and all(t > 0 for t in lat["latencies"])
    assert lat["percentiles"]["10"] <= lat["percentiles"]["50"] <= lat["percentiles"]["99"]
    assert lat["avg_latency"] == pytest.approx(np.mean(lat["latencies"]))

    out = tmp_path / "t.json"
    assert main(["bench", "throughput", scout_dir, "--num-prompts", "3", "--input-len", "8", "--output-len", "5",
                 "--dtype", "float32", "--max-model-len", "64", "--num-kv-blocks", "32", "--output-json",
                 str(out)]) == 0
    assert "Throughput:" in capsys.readouterr().out
    j = json.loads(out.read_text())
    assert j["total_output_tokens"] == 15 and j["total_prompt_tokens"] == 24 and j["tokens_per_second"] > 0
    out = tmp_path / "hf.json"
    assert main(["bench", "throughput", scout_dir, "--backend", "hf", "--num-prompts", "3", "--input-len", "8",
                 "--output-len", "5", "--hf-max-batch-size", "2", "--output-json", str(out)]) == 0
    j = json.loads(out.read_text())
    assert j["backend"] == "hf" and j["total_output_tokens"] == 15 and j["output_tokens_per_second"] > 0
    out = tmp_path / "l.json"
    assert main(["bench", "latency", scout_dir, "--batch-size", "2", "--input-len", "8", "--output-len", "3",
                 "--num-iters-warmup", "0", "--num-iters", "2", "--dtype", "float32", "--max-model-len", "64",
                 "--num-kv-blocks", "32", "--output-json", str(out)]) == 0
    assert "Avg latency:" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["latencies"]) == 2
