"""Prometheus metrics with vLLM's names, so vLLM dashboards work unchanged.

Engine gauges and token counters are read from the engine at scrape time; per-request
histograms are observed by the server when a request ends. Everything lives in one
CollectorRegistry per app: vLLM's engine metrics, the HTTP metrics vLLM exports through
prometheus-fastapi-instrumentator (same names, labels and buckets, observed by the app's
middleware), and prometheus_client's process / platform / GC collectors, as on vLLM's
default registry. Metrics vLLM does not have use the `herd:` prefix.
"""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, Summary, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from herd.engine.outputs import RequestOutput

# Bucket boundaries as in vLLM.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_TOKEN_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                          5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                            50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
_ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# prometheus-fastapi-instrumentator's defaults (vLLM uses them unchanged).
_HTTP_HIGHR_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5,
                       7.5, 10, 30, 60]
_HTTP_LOWR_BUCKETS = [0.1, 0.5, 1]
_LABELS = ["model_name", "engine"]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (token-count histograms)."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10 ** exponent
            if value > max_value:
                return out
            out.append(value)
        exponent += 1


class _EngineCollector:
    """Gauges and counters the engine keeps itself, read when /metrics is scraped."""

    def __init__(self, engine, labels: list[str]):
        self.engine, self.labels = engine, labels

    def collect(self):
        s = self.engine.get_stats()
        total_blocks = getattr(self.engine.engine, "num_blocks", {}) or {}

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=_LABELS)
            g.add_metric(self.labels, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=_LABELS)
            c.add_metric(self.labels, value)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    s.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    s.kv_cache_usage)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      s.num_preemptions)
        yield counter("vllm:prefix_cache_queries",
                      "Prefix cache queries, in terms of number of queried tokens.", s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      s.prefix_cache_hits)
        yield self._iteration_tokens()
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      s.generation_tokens)
        free = GaugeMetricFamily("herd:kv_cache_free_blocks", "Free KV-cache blocks per KV group.",
                                 labels=[*_LABELS, "group"])
        total = GaugeMetricFamily("herd:kv_cache_total_blocks", "KV-cache blocks per KV group.",
                                  labels=[*_LABELS, "group"])
        for group, n in s.free_blocks.items():
            free.add_metric([*self.labels, group], n)
            total.add_metric([*self.labels, group], total_blocks.get(group, 0))
        yield free
        yield total

    def _iteration_tokens(self) -> HistogramMetricFamily:
        """vLLM's vllm:iteration_tokens_total from the engine's exact per-step token counts."""
        steps = getattr(self.engine.engine, "iteration_tokens", {}).copy()  # the engine thread adds to it
        h = HistogramMetricFamily("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                  labels=_LABELS)
        buckets = [(floatToGoString(b), sum(c for n, c in steps.items() if n <= b)) for b in _ITERATION_TOKEN_BUCKETS]
        buckets.append(("+Inf", sum(steps.values())))
        h.add_metric(self.labels, buckets, sum_value=sum(n * c for n, c in steps.items()))
        return h


def cache_config_labels(engine) -> dict[str, str]:
    """vllm:cache_config_info labels: vLLM's CacheConfig field names for what herd has, as strings."""
    cache = engine.config.cache
    blocks = getattr(engine.engine, "num_blocks", {}) or {}
    return {"block_size": str(cache.block_size), "cache_dtype": str(cache.kv_cache_dtype),
            "enable_prefix_caching": str(cache.enable_prefix_caching),
            "gpu_memory_utilization": str(cache.gpu_memory_utilization),
            "num_gpu_blocks": str(sum(blocks.values())), "num_gpu_blocks_override": str(cache.num_kv_blocks),
            "cpu_kvcache_space_bytes": str(int(cache.cpu_kv_cache_space_gib * (1 << 30))), "engine": "0"}


class ServerMetrics:
    def __init__(self, engine, model_name: str, max_model_len: int):
        self.registry = CollectorRegistry()
        labels = [model_name, "0"]
        self.registry.register(_EngineCollector(engine, labels))
        reg = self.registry
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        info = cache_config_labels(engine)
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(info),
              registry=reg).labels(**info).set(1)

        def hist(name, doc, buckets):
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=reg).labels(*labels)

        token_buckets = build_1_2_5_buckets(max_model_len)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         _TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        _TOKEN_LATENCY_BUCKETS)
        # vLLM's older name for the same per-step gaps, still exported (and used by dashboards)
        self.itl_v0 = hist("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                           _TOKEN_LATENCY_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.", _TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds",
                        "Histogram of e2e request latency in seconds.", _REQUEST_LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds",
                          "Histogram of time spent in WAITING phase for request.", _REQUEST_LATENCY_BUCKETS)
        self.inference = hist("vllm:request_inference_time_seconds",
                              "Histogram of time spent in RUNNING phase for request.", _REQUEST_LATENCY_BUCKETS)
        self.prefill = hist("vllm:request_prefill_time_seconds",
                            "Histogram of time spent in PREFILL phase for request.", _REQUEST_LATENCY_BUCKETS)
        self.decode = hist("vllm:request_decode_time_seconds",
                           "Histogram of time spent in DECODE phase for request.", _REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                  token_buckets)
        self.generation_tokens = hist("vllm:request_generation_tokens",
                                      "Number of generation tokens processed.", token_buckets)
        self.max_generation_tokens = hist("vllm:request_max_num_generation_tokens",
                                          "Histogram of maximum number of requested generation tokens.",
                                          token_buckets)
        self.params_n = hist("vllm:request_params_n", "Histogram of the n request parameter.",
                             [1, 2, 5, 10, 20])
        self.params_max_tokens = hist("vllm:request_params_max_tokens",
                                      "Histogram of the max_tokens request parameter.", token_buckets)
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                [*_LABELS, "finished_reason"], registry=reg)
        self._labels = labels
        self.http_requests = Counter("http_requests_total", "Total number of requests by method, status and handler.",
                                     ["method", "status", "handler"], registry=reg)
        self.http_request_size = Summary(
            "http_request_size_bytes", "Content length of incoming requests by handler. Only value of header is "
            "respected. Otherwise ignored. No percentile calculated.", ["handler"], registry=reg)
        self.http_response_size = Summary(
            "http_response_size_bytes", "Content length of outgoing responses by handler. Only value of header is "
            "respected. Otherwise ignored. No percentile calculated.", ["handler"], registry=reg)
        self.http_latency_highr = Histogram(
            "http_request_duration_highr_seconds", "Latency with many buckets but no API specific labels. Made for "
            "more accurate percentile calculations.", buckets=_HTTP_HIGHR_BUCKETS, registry=reg)
        self.http_latency = Histogram(
            "http_request_duration_seconds", "Latency with only few buckets by handler. Made to be only used if "
            "aggregation by handler is important.", ["method", "handler"], buckets=_HTTP_LOWR_BUCKETS, registry=reg)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_finished(self, reason: str, n: int = 1):
        self._success.labels(*self._labels, reason).inc(n)

    def observe_token_gap(self, seconds: float):
        self.itl.observe(seconds)
        self.itl_v0.observe(seconds)

    def observe_http(self, method: str, status: int, handler: str, request_bytes: int, response_bytes: int,
                     seconds: float):
        """One HTTP request, as prometheus-fastapi-instrumentator records it (status grouped: 2xx, 4xx)."""
        self.http_requests.labels(method, f"{str(status)[0]}xx", handler).inc()
        self.http_request_size.labels(handler).observe(request_bytes)
        self.http_response_size.labels(handler).observe(response_bytes)
        self.http_latency_highr.observe(seconds)
        self.http_latency.labels(method, handler).observe(seconds)

    def observe_request(self, out: RequestOutput, max_tokens: int, n: int):
        """A finished request: latencies from its timestamps, token counts, parameters."""
        for o in out.outputs:
            self.count_finished(o.finish_reason or "abort")
        gen = [len(o.token_ids) for o in out.outputs]
        self.prompt_tokens.observe(len(out.prompt_token_ids))
        self.generation_tokens.observe(sum(gen))
        self.max_generation_tokens.observe(max(gen, default=0))
        self.params_n.observe(n)
        self.params_max_tokens.observe(max_tokens)
        m = out.metrics
        if m is None:
            return
        end = m.finished_time or m.last_token_time
        if end is not None:
            self.e2e.observe(max(end - m.arrival_time, 0.0))
        if m.first_token_time is not None:
            self.ttft.observe(max(m.first_token_time - m.arrival_time, 0.0))
        if m.first_scheduled_time is not None:
            self.queue.observe(max(m.first_scheduled_time - m.arrival_time, 0.0))
            if end is not None:
                self.inference.observe(max(end - m.first_scheduled_time, 0.0))
            if m.first_token_time is not None:
                self.prefill.observe(max(m.first_token_time - m.first_scheduled_time, 0.0))
        if m.first_token_time is not None and m.last_token_time is not None:
            self.decode.observe(max(m.last_token_time - m.first_token_time, 0.0))
            if gen[0] > 1:
                self.tpot.observe((m.last_token_time - m.first_token_time) / (gen[0] - 1))
