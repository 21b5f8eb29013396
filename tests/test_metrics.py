"""/metrics of a real `herd serve`, parsed with prometheus_client's parser: vLLM's engine metrics
(prefix cache, iteration tokens, cache config, preemptions, per-step latency), the HTTP request
metrics vLLM exports through prometheus-fastapi-instrumentator, and the process collector's."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_utils import RemoteServer

MODEL = "tiny"
BLOCK = 4
KV_BLOCKS = 24  # small: n=4 long samples cannot all fit, so the scheduler must preempt
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
# A prompt of several full blocks, repeated to hit the prefix cache.
PROMPT = "Llamas and alpacas graze on the high plains of the Andes"


@pytest.fixture(scope="module")
def server(scout_dir):
    srv = RemoteServer(scout_dir, [
        "--dtype", "float32", "--block-size", str(BLOCK), "--num-kv-blocks", str(KV_BLOCKS), "--max-model-len", "64",
        "--served-model-name", MODEL, "--device", "cpu", "--disable-log-stats", "--disable-uvicorn-access-log",
        "--enable-prefix-caching"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def families(server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


class Delta:
    def __init__(self, server):
        self.server, self.before = server, server.metrics()

    def __call__(self, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return self.server.metrics().get(key, 0) - self.before.get(key, 0)


def test_prefix_cache_and_iteration_tokens(server, client):
    d = Delta(server)
    first = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, **GREEDY)
    n = first.usage.prompt_tokens
    assert n >= 3 * BLOCK
    assert d("vllm:prefix_cache_queries_total") == n
    cached_first = d("vllm:prefix_cache_hits_total")
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, **GREEDY)
    assert again.choices[0].text == first.choices[0].text
    assert d("vllm:prefix_cache_queries_total") == 2 * n
    hits = d("vllm:prefix_cache_hits_total") - cached_first
    assert BLOCK <= hits < n  # whole blocks of the repeated prompt; the last token is always computed
    # every token the engine computed in a step, once: prompts minus cached tokens, plus all but the
    # last sampled token of each completion
    assert d("vllm:iteration_tokens_total_sum") == 2 * n - (cached_first + hits) + 2 * (3 - 1)
    assert d("vllm:iteration_tokens_total_count") >= 2 * 3
    # per-step gaps under vLLM's old and new names: one per output message after a request's
    # first, so at most 2 per completion; fewer when a loaded front end receives steps coalesced
    gaps = d("vllm:inter_token_latency_seconds_count")
    assert d("vllm:time_per_output_token_seconds_count") == gaps and 1 <= gaps <= 2 * (3 - 1)
    fam = families(server)
    bounds = [s.labels["le"] for s in fam["vllm:iteration_tokens_total"].samples if s.name.endswith("_bucket")]
    vllm_buckets = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    assert bounds == [str(float(b)) for b in vllm_buckets] + ["+Inf"]


def test_preemptions_are_counted(server, client):
    d = Delta(server)
    # 4 samples of 40 tokens need about 4 * 16 blocks of the 24 there are
    r = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=40, n=4, temperature=1.0, seed=3,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 4 * 40
    assert d("vllm:num_preemptions_total") >= 1
    assert d("vllm:request_success_total", finished_reason="length") == 4


def test_cache_config_info(server):
    fam = families(server)
    (sample,) = fam["vllm:cache_config_info"].samples
    assert sample.value == 1
    labels = sample.labels
    assert labels["block_size"] == str(BLOCK) and labels["enable_prefix_caching"] == "True"
    assert labels["cache_dtype"] == "auto" and labels["engine"] == "0"
    assert labels["num_gpu_blocks_override"] == str(KV_BLOCKS)
    total = sum(s.value for s in fam["herd:kv_cache_total_blocks"].samples)
    assert int(labels["num_gpu_blocks"]) == total > 0


def test_http_request_metrics(server, client):
    d = Delta(server)
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    ok = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                    timeout=60)
    assert ok.status_code == 200
    bad = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "temperature": -1})
    assert bad.status_code == 400
    assert httpx.get(server.url + "/no/such/path").status_code == 404
    assert httpx.get(server.url + "/health").status_code == 200
    list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True))
    completions = dict(handler="/v1/completions", method="POST")
    assert d("http_requests_total", status="2xx", **completions) == 2
    assert d("http_requests_total", status="4xx", **completions) == 1
    assert d("http_requests_total", handler="none", method="GET", status="4xx") == 1  # no route: "none"
    assert d("http_request_duration_seconds_count", **completions) == 3
    assert d("http_request_duration_highr_seconds_count") == 4
    assert d("http_request_size_bytes_count", handler="/v1/completions") == 3
    assert d("http_request_size_bytes_sum", handler="/v1/completions") >= len(body)
    assert d("http_response_size_bytes_sum", handler="/v1/completions") >= len(ok.content) + len(bad.content)
    fam = families(server)
    handlers = {s.labels.get("handler") for s in fam["http_requests"].samples}
    assert "/health" not in handlers and "/metrics" not in handlers  # left out, as in vLLM
    bounds = [s.labels["le"] for s in fam["http_request_duration_seconds"].samples if s.name.endswith("_bucket")
              and s.labels["handler"] == "/v1/completions"]
    assert bounds == ["0.1", "0.5", "1.0", "+Inf"]
    assert len([s for s in fam["http_request_duration_highr_seconds"].samples if s.name.endswith("_bucket")]) == 22


def test_process_metrics(server):
    m = server.metrics()
    assert m[("process_resident_memory_bytes", ())] > 10 * 2 ** 20
    assert m[("process_cpu_seconds_total", ())] > 0
    assert m[("process_open_fds", ())] > 0 and m[("process_start_time_seconds", ())] > 0
    assert any(name == "python_info" for name, _ in m)
    assert any(name.startswith("python_gc_objects_collected") for name, _ in m)
