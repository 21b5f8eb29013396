"""Serving metrics from timed requests, and the result block in `vllm bench serve`'s layout."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from herd.bench.request import RequestOutput

# name in flags and JSON keys -> (label in the block, section header)
METRICS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    # per metric: samples in seconds, and mean/median/std/percentiles in ms
    samples: dict[str, list[float]] = field(default_factory=dict)
    stats_ms: dict[str, dict[str, float]] = field(default_factory=dict)


def tpot_of(o: RequestOutput) -> float | None:
    """Decode time per token after the first: (e2e - ttft) / (output_tokens - 1)."""
    return (o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else None


def token_times(outputs: list[RequestOutput]) -> tuple[np.ndarray, np.ndarray]:
    """(time, tokens) per streamed chunk; a request's tokens are spread evenly over its chunks,
    since a chunk may carry more than one token."""
    times, counts = [], []
    for o in outputs:
        if o.success and o.chunk_times:
            per = o.output_tokens / len(o.chunk_times)
            times.extend(o.chunk_times)
            counts.extend([per] * len(o.chunk_times))
    return np.asarray(times, dtype=float), np.asarray(counts, dtype=float)


def peak_concurrency(outputs: list[RequestOutput]) -> int:
    events = sorted([(o.start_time, 1) for o in outputs] + [(o.start_time + o.latency, -1) for o in outputs],
                    key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """--goodput ttft:500 tpot:50 (milliseconds) -> {"ttft": 500.0, "tpot": 50.0}."""
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput entries are NAME:MS with NAME one of ttft, tpot, e2el; got {item!r}")
        slos[name] = float(value)
    return slos


def calculate_metrics(outputs: list[RequestOutput], duration: float, percentiles: list[float],
                      goodput_slos: dict[str, float] | None = None, start_time: float | None = None
                      ) -> BenchmarkMetrics:
    ok = [o for o in outputs if o.success]
    samples = {"ttft": [o.ttft for o in ok],
               "tpot": [t for t in (tpot_of(o) for o in ok) if t is not None],
               "itl": [g for o in ok for g in o.itl],
               "e2el": [o.latency for o in ok]}
    stats = {}
    for name, xs in samples.items():
        a = np.asarray(xs or [0.0]) * 1000.0
        stats[name] = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()),
                       **{f"p{_pword(p)}": float(np.percentile(a, p)) for p in percentiles}}
    goodput = None
    if goodput_slos:
        good = 0
        for o in ok:
            values = {"ttft": o.ttft, "tpot": tpot_of(o) or 0.0, "e2el": o.latency}
            good += all(values[k] * 1000.0 <= v for k, v in goodput_slos.items())
        goodput = good / duration
    t, n = token_times(ok)
    peak_tok = 0.0
    if len(t):
        t0 = start_time if start_time is not None else t.min()
        buckets = np.floor(t - t0).astype(int)  # one-second bins since the benchmark started
        peak_tok = float(np.bincount(buckets, weights=n).max())
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    return BenchmarkMetrics(
        completed=len(ok), failed=len(outputs) - len(ok), total_input=total_in, total_output=total_out,
        duration=duration, request_throughput=len(ok) / duration, request_goodput=goodput,
        output_throughput=total_out / duration, total_token_throughput=(total_in + total_out) / duration,
        max_output_tokens_per_s=peak_tok, max_concurrent_requests=peak_concurrency(outputs),
        samples=samples, stats_ms=stats)


def _pword(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def format_result(m: BenchmarkMetrics, max_concurrency: int | None, request_rate: float,
                  selected: list[str], percentiles: list[float]) -> str:
    """The block `vllm bench serve` prints, line for line."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label, value, fmt="<10"):
        lines.append(f"{label:<40} {value:{fmt}}")

    row("Successful requests:", m.completed)
    row("Failed requests:", m.failed)
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    if not math.isinf(request_rate):
        row("Request rate configured (RPS):", request_rate, "<10.2f")
    row("Benchmark duration (s):", m.duration, "<10.2f")
    row("Total input tokens:", m.total_input)
    row("Total generated tokens:", m.total_output)
    row("Request throughput (req/s):", m.request_throughput, "<10.2f")
    if m.request_goodput is not None:
        row("Request goodput (req/s):", m.request_goodput, "<10.2f")
    row("Output token throughput (tok/s):", m.output_throughput, "<10.2f")
    row("Peak output token throughput (tok/s):", m.max_output_tokens_per_s, "<10.2f")
    row("Peak concurrent requests:", float(m.max_concurrent_requests), "<10.2f")
    row("Total Token throughput (tok/s):", m.total_token_throughput, "<10.2f")
    for name in selected:
        label, header = METRICS[name]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        st = m.stats_ms[name]
        row(f"Mean {label} (ms):", st["mean"], "<10.2f")
        row(f"Median {label} (ms):", st["median"], "<10.2f")
        for p in percentiles:
            row(f"P{_pword(p)} {label} (ms):", st[f"p{_pword(p)}"], "<10.2f")
    lines.append("=" * 50)
    return "\n".join(lines)


def result_json(m: BenchmarkMetrics, outputs: list[RequestOutput], percentiles: list[float]) -> dict:
    """vLLM's result keys: totals, per-request lists (seconds) and mean/median/std/pNN per metric (ms)."""
    out = {"duration": m.duration, "completed": m.completed, "failed": m.failed,
           "total_input_tokens": m.total_input, "total_output_tokens": m.total_output,
           "request_throughput": m.request_throughput, "request_goodput": m.request_goodput,
           "output_throughput": m.output_throughput, "total_token_throughput": m.total_token_throughput,
           "max_output_tokens_per_s": m.max_output_tokens_per_s,
           "max_concurrent_requests": m.max_concurrent_requests,
           "input_lens": [o.prompt_len for o in outputs], "output_lens": [o.output_tokens for o in outputs],
           "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
           "e2els": [o.latency for o in outputs],
           "generated_texts": [o.generated_text for o in outputs], "errors": [o.error for o in outputs]}
    for name in METRICS:
        for stat in ("mean", "median", "std", *(f"p{_pword(p)}" for p in percentiles)):
            out[f"{stat}_{name}_ms"] = m.stats_ms[name][stat]
    return out
