"""`herd bench serve`: load an OpenAI-compatible server (herd, vLLM, ...) and report TTFT/TPOT/ITL/E2EL.

Requests stream from /v1/completions (or /v1/chat/completions); arrivals are Poisson at
--request-rate (gamma-distributed gaps with --burstiness), or all at once for `inf`, capped by
--max-concurrency. The printed block follows `vllm bench serve`.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from datetime import datetime

import httpx
import numpy as np

from herd.bench.datasets import HFTokenizer, ServerTokenizer, add_dataset_args, load_requests
from herd.bench.metrics import METRICS, calculate_metrics, format_result, parse_goodput, result_json
from herd.bench.request import RequestInput, send_request


def add_arguments(parser):
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", "--base_url", dest="base_url", default=None,
                   help="server root, e.g. http://127.0.0.1:8000 (default: http://HOST:PORT)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", default="/v1/completions",
                   help="/v1/completions or /v1/chat/completions")
    g.add_argument("--backend", default=None, choices=["openai", "openai-chat", "vllm"],
                   help="openai(-chat) as in vLLM; only picks the default endpoint here")
    g.add_argument("--model", default=None, help="model name sent in requests (default: the first of /v1/models)")
    g.add_argument("--tokenizer", default=None,
                   help="local tokenizer folder for exact prompt lengths (default: the server's /tokenize, "
                        "else words)")
    g.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                   help="bearer token (default: $HERD_API_KEY or $VLLM_API_KEY)")
    add_dataset_args(parser)
    r = parser.add_argument_group("load")
    r.add_argument("--request-rate", "--request_rate", dest="request_rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    r.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 steadier")
    r.add_argument("--max-concurrency", "--max_concurrency", dest="max_concurrency", type=int, default=None,
                   help="most requests in flight at once")
    r.add_argument("--ignore-eos", "--ignore_eos", dest="ignore_eos", action="store_true",
                   help="generate exactly the output length (vLLM's ignore_eos extension)")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--request-timeout", "--request_timeout", dest="request_timeout", type=float, default=3600.0,
                   help="seconds one request may take")
    r.add_argument("--skip-test-run", action="store_true", help="do not send one request first to check the setup")
    o = parser.add_argument_group("results")
    o.add_argument("--percentile-metrics", "--percentile_metrics", dest="percentile_metrics",
                   default="ttft,tpot,itl,e2el", help="which metrics to print (ttft,tpot,itl,e2el)")
    o.add_argument("--metric-percentiles", "--metric_percentiles", dest="metric_percentiles", default="99",
                   help="comma-separated percentiles, e.g. 50,90,99")
    o.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50")
    o.add_argument("--save-result", "--save_result", dest="save_result", action="store_true",
                   help="write the JSON result and PNG plots")
    o.add_argument("--result-dir", "--result_dir", dest="result_dir", default=".")
    o.add_argument("--result-filename", "--result_filename", dest="result_filename", default=None)
    o.add_argument("--no-plots", action="store_true", help="with --save-result: JSON only")
    o.add_argument("--disable-tqdm", "--disable_tqdm", dest="disable_tqdm", action="store_true")


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: 0 for rate inf; else gamma(shape=burstiness) gaps
    with mean 1/rate (exponential, i.e. Poisson arrivals, for burstiness 1)."""
    if rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n).tolist()


def _base_url(args) -> str:
    url = args.base_url or f"http://{args.host}:{args.port}"
    return url.rstrip("/")


def _headers(args) -> dict:
    from herd.config import api_key_from_env
    key = args.api_key or api_key_from_env()
    return {"Authorization": f"Bearer {key}"} if key else {}


def _first_model(base_url: str, headers: dict) -> str:
    r = httpx.get(base_url + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    models = r.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


async def benchmark(base_url: str, headers: dict, inputs: list[RequestInput], gaps: list[float],
                    max_concurrency: int | None, timeout: float, disable_tqdm: bool = False,
                    test_run: bool = True):
    """Send every input; returns (outputs, wall seconds, perf_counter at start)."""
    from tqdm.asyncio import tqdm

    limits = httpx.Limits(max_connections=max_concurrency or len(inputs), max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, pool=None)) as client:
        if test_run:
            first = await send_request(client, inputs[0])
            if not first.success:
                raise RuntimeError(f"the test request failed: {first.error}")
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        pbar = None if disable_tqdm else tqdm(total=len(inputs), desc="requests")

        async def limited(inp):
            if sem is None:
                return await send_request(client, inp, pbar)
            async with sem:
                return await send_request(client, inp, pbar)

        start = time.perf_counter()
        tasks = []
        for inp, gap in zip(inputs, gaps):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(inp)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if pbar is not None:
            pbar.close()
    return list(outputs), duration, start


def _resolve_tokenizer(args, base_url: str, headers: dict, model: str):
    if args.tokenizer:
        return HFTokenizer(args.tokenizer)
    tok = ServerTokenizer.probe(base_url, model, headers)
    if tok is None:
        print("herd bench serve: note: no --tokenizer and the server has no /tokenize; prompt lengths are "
              "counted in words", file=sys.stderr)
    return tok


def run(args) -> int:
    base_url = _base_url(args)
    headers = _headers(args)
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    bad = [m for m in selected if m not in METRICS]
    if bad:
        print(f"herd bench serve: unknown --percentile-metrics {bad}; choose from {list(METRICS)}", file=sys.stderr)
        return 2
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    endpoint = args.endpoint
    if args.backend == "openai-chat" and endpoint == "/v1/completions":
        endpoint = "/v1/chat/completions"
    try:
        slos = parse_goodput(args.goodput)
        model = args.model or _first_model(base_url, headers)
        tokenizer = _resolve_tokenizer(args, base_url, headers, model)
        requests = load_requests(args, tokenizer)
        if isinstance(tokenizer, ServerTokenizer):
            tokenizer.client.close()
        gaps = arrival_gaps(len(requests), args.request_rate, args.burstiness, args.seed)
    except (ValueError, OSError, httpx.HTTPError) as e:
        print(f"herd bench serve: error: {e}", file=sys.stderr)
        return 2
    inputs = [RequestInput(prompt=r.prompt, prompt_len=r.prompt_len, output_len=r.expected_output_len,
                           model=model, endpoint=endpoint, ignore_eos=args.ignore_eos,
                           temperature=args.temperature) for r in requests]
    print(f"Traffic request rate: {args.request_rate}, burstiness: {args.burstiness}, "
          f"max concurrency: {args.max_concurrency}")
    try:
        outputs, duration, start = asyncio.run(benchmark(
            base_url, headers, inputs, gaps, args.max_concurrency, args.request_timeout,
            args.disable_tqdm, not args.skip_test_run))
    except RuntimeError as e:
        print(f"herd bench serve: error: {e}", file=sys.stderr)
        return 1
    metrics = calculate_metrics(outputs, duration, percentiles, slos, start)
    print(format_result(metrics, args.max_concurrency, args.request_rate, selected, percentiles))
    errors = [o.error for o in outputs if not o.success]
    if errors:
        print(f"first error: {errors[0]}", file=sys.stderr)
    if args.save_result:
        save_results(args, model, base_url, endpoint, getattr(tokenizer, "name", None), metrics, outputs,
                     percentiles, start)
    return 0 if metrics.completed else 1


def save_results(args, model, base_url, endpoint, tok_name, metrics, outputs, percentiles, start) -> list[str]:
    now = datetime.now()
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    name = args.result_filename or f"herd-bench-serve-{rate}qps{conc}-{now:%Y%m%d-%H%M%S}.json"
    os.makedirs(args.result_dir, exist_ok=True)
    path = os.path.join(args.result_dir, name)
    result = {"date": now.strftime("%Y%m%d-%H%M%S"), "backend": args.backend or "openai", "base_url": base_url,
              "endpoint": endpoint, "model_id": model, "tokenizer_id": tok_name,
              "dataset_name": args.dataset_name, "num_prompts": args.num_prompts,
              "request_rate": rate, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              **result_json(metrics, outputs, percentiles)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    written = [path]
    if not args.no_plots:
        from herd.bench.plots import plot_latency_cdfs, plot_throughput
        stem = os.path.splitext(path)[0]
        title = f"{model} @ {rate} req/s{', concurrency ' + str(args.max_concurrency) if args.max_concurrency else ''}"
        written.append(plot_latency_cdfs(metrics, stem + "_latency_cdf.png", title))
        written.append(plot_throughput(outputs, start, stem + "_throughput.png", title))
    for p in written:
        print(f"saved {p}")
    return written
