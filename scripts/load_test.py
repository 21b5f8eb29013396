#!/usr/bin/env python
"""Load test for `herd serve`: mixed requests at high concurrency against a server on loopback
with a small KV pool, while some clients disconnect mid-stream.

Requests mix /v1/completions and /v1/chat/completions, streaming and not, n = 1..3, random prompt
and output lengths, greedy and seeded sampling, plus a few invalid ones. Passes when
  * every request that was not cut off by its client completes correctly: status 200, n choices
    that each finish once, the token counts asked for, SSE streams ending in [DONE], and greedy
    outputs equal to a reference taken one request at a time on the idle server (a departure is
    only accepted at a near-tie of the reference's top two logprobs, where batch-dependent float
    rounding may pick the other token); invalid requests get 400 with an OpenAI error body;
  * no response is a 5xx and no request fails at the transport level;
  * afterwards nothing runs or waits in the engine and every KV block is free;
  * the whole run ends within --max-seconds.

    python scripts/load_test.py                      # 2,000 requests, concurrency 256
    python scripts/load_test.py --requests 200 --concurrency 32 --url http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("the quick brown fox jumps over lazy dog while llamas graze in green fields of the high "
         "andes mixture experts route each token to one expert and a shared expert word herd").split()
NEAR_TIE = 1e-3  # top-1 minus top-2 logprob below which either token is a correct greedy pick


@dataclass
class Spec:
    index: int
    kind: str                  # "completion" | "chat"
    body: dict
    stream: bool
    n: int
    max_tokens: int
    ignore_eos: bool
    greedy_key: tuple | None = None        # (kind, prompt index) of a reference output
    disconnect_after: int | None = None    # close the stream after this many data chunks
    expect_status: int = 200

    @property
    def path(self) -> str:
        return "/v1/completions" if self.kind == "completion" else "/v1/chat/completions"


@dataclass
class Result:
    spec: Spec
    status: int | None = None
    tokens: dict[int, list[int]] = field(default_factory=dict)   # choice index -> token ids (greedy)
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, list[str]] = field(default_factory=dict)
    usage: dict | None = None
    done: bool = False                     # saw data: [DONE]
    disconnected: bool = False
    error: str | None = None               # transport error or unparsable response
    body: dict | None = None               # error body of a non-200 response
    latency: float = 0.0


# ---- workload -------------------------------------------------------------------------------

def prompt_text(rng: random.Random, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def greedy_pool(num: int, max_words: int, seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    return [prompt_text(rng, max_words) for _ in range(num)]


def request_body(kind: str, text: str, model: str, max_tokens: int, **extra) -> dict:
    body = {"model": model, "max_tokens": max_tokens, **extra}
    if kind == "completion":
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "system", "content": "You are a herd of llamas."},
                            {"role": "user", "content": text}]
    return body


def greedy_logprobs(kind: str, top: int) -> dict:
    """Ask for token ids (and the top `top` alternatives) with each generated token."""
    if kind == "completion":
        return {"logprobs": top, "return_tokens_as_token_ids": True}
    return {"logprobs": True, "top_logprobs": top, "return_tokens_as_token_ids": True}


def make_workload(num_requests: int, seed: int, model: str, max_model_len: int, *, pool: list[str],
                  max_words: int, max_tokens: int, greedy_max_tokens: int, disconnect_frac: float = 0.1,
                  invalid_frac: float = 0.02, greedy_frac: float = 0.3) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(num_requests):
        kind = rng.choice(("completion", "chat"))
        u = rng.random()
        if u < disconnect_frac:  # a client that goes away after a few chunks
            m = rng.randint(16, max_tokens)
            body = request_body(kind, prompt_text(rng, max_words), model, m, temperature=0.8,
                                seed=rng.randrange(2 ** 31), ignore_eos=True, stream=True,
                                n=rng.randint(1, 3))
            specs.append(Spec(i, kind, body, True, body["n"], m, True, disconnect_after=rng.randint(1, 4)))
            continue
        if u < disconnect_frac + invalid_frac:  # refused with 400, in the middle of the load
            bad = rng.choice(({"temperature": -1.0}, {"max_tokens": max_model_len + 1}, {"top_p": 2.0}))
            body = {**request_body(kind, prompt_text(rng, max_words), model, 8), **bad}
            specs.append(Spec(i, kind, body, False, 1, 8, False, expect_status=400))
            continue
        stream = rng.random() < 0.5
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        if rng.random() < greedy_frac:
            p = rng.randrange(len(pool))
            m = rng.randint(1, greedy_max_tokens)
            body = request_body(kind, pool[p], model, m, temperature=0.0, ignore_eos=True,
                                **greedy_logprobs(kind, 0), **extra)
            specs.append(Spec(i, kind, body, stream, 1, m, True, greedy_key=(kind, p)))
            continue
        n, m = rng.randint(1, 3), rng.randint(1, max_tokens)
        ignore_eos = rng.random() < 0.85
        body = request_body(kind, prompt_text(rng, max_words), model, m, n=n, temperature=0.8,
                            seed=rng.randrange(2 ** 31), ignore_eos=ignore_eos, **extra)
        specs.append(Spec(i, kind, body, stream, n, m, ignore_eos))
    return specs


# ---- one request ----------------------------------------------------------------------------

def _tokens_from_logprobs(kind: str, logprobs) -> list[int]:
    if not logprobs:
        return []
    items = logprobs["tokens"] if kind == "completion" else [c["token"] for c in logprobs["content"]]
    return [int(t.split(":", 1)[1]) for t in items]


def _absorb_choice(res: Result, kind: str, choice: dict, stream: bool):
    i = choice["index"]
    if kind == "completion":
        text = choice.get("text") or ""
    else:
        text = ((choice.get("delta") if stream else choice.get("message")) or {}).get("content") or ""
    res.texts[i] = res.texts.get(i, "") + text
    res.tokens.setdefault(i, []).extend(_tokens_from_logprobs(kind, choice.get("logprobs")))
    if choice.get("finish_reason"):
        res.finish.setdefault(i, []).append(choice["finish_reason"])


async def send(client: httpx.AsyncClient, spec: Spec) -> Result:
    res = Result(spec)
    t0 = time.monotonic()
    try:
        if not spec.stream:
            r = await client.post(spec.path, json=spec.body)
            res.status = r.status_code
            body = r.json()
            if r.status_code != 200:
                res.body = body
            else:
                for choice in body["choices"]:
                    _absorb_choice(res, spec.kind, choice, stream=False)
                res.usage = body.get("usage")
        else:
            async with client.stream("POST", spec.path, json=spec.body) as r:
                res.status = r.status_code
                if r.status_code != 200:
                    res.body = json.loads(await r.aread())
                    return res
                chunks = 0
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    if not line.startswith("data: "):
                        raise ValueError(f"not an SSE data line: {line[:80]!r}")
                    if line == "data: [DONE]":
                        res.done = True
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise ValueError(f"error in the stream: {chunk['error']}")
                    chunks += 1
                    for choice in chunk.get("choices", []):
                        _absorb_choice(res, spec.kind, choice, stream=True)
                    if chunk.get("usage"):
                        res.usage = chunk["usage"]
                    if spec.disconnect_after is not None and chunks >= spec.disconnect_after:
                        res.disconnected = True
                        break  # leaving the block closes the connection mid-stream
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.latency = time.monotonic() - t0
    return res


# ---- checks ---------------------------------------------------------------------------------

def compare_greedy(tokens: list[int], ref_tokens: list[int], ref_gaps: list[float]) -> str:
    """'exact', 'near-tie' (departs where the reference's top two were within NEAR_TIE) or
    'mismatch'."""
    for i, t in enumerate(tokens):
        if i >= len(ref_tokens):
            return "mismatch"
        if t != ref_tokens[i]:
            return "near-tie" if ref_gaps[i] < NEAR_TIE else "mismatch"
    return "exact"


def check(res: Result, refs: dict) -> tuple[str, list[str]]:
    """(category, problems). Categories: ok, disconnected, refused (expected 4xx)."""
    s, problems = res.spec, []
    if res.error:
        return "failed", [res.error]
    if res.status != s.expect_status:
        return "failed", [f"status {res.status}, expected {s.expect_status}: {res.body}"]
    if s.expect_status != 200:
        err = (res.body or {}).get("error")
        ok = (isinstance(err, dict) and isinstance(err.get("message"), str) and err.get("code") == res.status
              and "type" in err and "param" in err)
        return ("refused", []) if ok else ("failed", [f"not an OpenAI error body: {res.body}"])
    if res.disconnected:
        return "disconnected", []
    if s.stream and not res.done:
        problems.append("stream ended without [DONE]")
    if sorted(res.finish) != list(range(s.n)):
        problems.append(f"finished choices {sorted(res.finish)}, expected {s.n}")
    for i, reasons in res.finish.items():
        if len(reasons) != 1 or reasons[0] not in ("length", "stop"):
            problems.append(f"choice {i} finish reasons {reasons}")
        elif s.ignore_eos and reasons[0] != "length":
            problems.append(f"choice {i} finished with {reasons[0]} despite ignore_eos")
    usage = res.usage or {}
    want = s.n * s.max_tokens
    got = usage.get("completion_tokens")
    if got is None or (s.ignore_eos and got != want) or got > want or not usage.get("prompt_tokens"):
        problems.append(f"usage {usage}, expected {want} completion tokens")
    if s.greedy_key is not None and not problems:
        ref_tokens, ref_gaps = refs[s.greedy_key]
        tokens = res.tokens.get(0, [])
        if len(tokens) != s.max_tokens:
            problems.append(f"{len(tokens)} token ids, expected {s.max_tokens}")
        else:
            verdict = compare_greedy(tokens, ref_tokens, ref_gaps)
            if verdict == "mismatch":
                problems.append(f"greedy output {tokens} departs from the reference {ref_tokens[:len(tokens)]}")
            elif verdict == "near-tie":
                return "ok-near-tie", []
    return ("failed", problems) if problems else ("ok", [])


async def reference_outputs(client: httpx.AsyncClient, pool: list[str], model: str, max_tokens: int) -> dict:
    """Greedy outputs with top-2 logprobs, one request at a time on the idle server."""
    refs = {}
    for kind in ("completion", "chat"):
        for p, text in enumerate(pool):
            spec = Spec(-1, kind, request_body(kind, text, model, max_tokens, temperature=0.0, ignore_eos=True,
                                               **greedy_logprobs(kind, 2)), False, 1, max_tokens, True)
            r = await client.post(spec.path, json=spec.body)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            tokens = _tokens_from_logprobs(kind, choice["logprobs"])
            if kind == "completion":
                tops = [sorted(d.values(), reverse=True) for d in choice["logprobs"]["top_logprobs"]]
            else:
                tops = [sorted((t["logprob"] for t in c["top_logprobs"]), reverse=True)
                        for c in choice["logprobs"]["content"]]
            gaps = [v[0] - v[1] if len(v) > 1 else float("inf") for v in tops]
            refs[(kind, p)] = (tokens, gaps)
    return refs


# ---- server state ---------------------------------------------------------------------------

async def engine_state(client: httpx.AsyncClient) -> dict:
    text = (await client.get("/metrics")).text
    out = {"free": {}, "total": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:num_requests_running":
                out["running"] = s.value
            elif s.name == "vllm:num_requests_waiting":
                out["waiting"] = s.value
            elif s.name in ("vllm:num_preemptions_total", "vllm:num_preemptions"):
                out["preemptions"] = s.value
            elif s.name == "herd:kv_cache_free_blocks":
                out["free"][s.labels["group"]] = s.value
            elif s.name == "herd:kv_cache_total_blocks":
                out["total"][s.labels["group"]] = s.value
    out["server_load"] = (await client.get("/load")).json()["server_load"]
    return out


def is_idle(state: dict) -> bool:
    return (state.get("running") == 0 and state.get("waiting") == 0 and state["server_load"] == 0
            and state["free"] == state["total"] and bool(state["total"]))


async def wait_idle(client: httpx.AsyncClient, timeout: float) -> tuple[bool, dict]:
    deadline = time.monotonic() + timeout
    while True:
        state = await engine_state(client)
        if is_idle(state) or time.monotonic() > deadline:
            return is_idle(state), state
        await asyncio.sleep(0.1)


# ---- the run --------------------------------------------------------------------------------

async def run_load(url: str, specs: list[Spec], concurrency: int, api_key: str | None = None, *,
                   pool: list[str], greedy_max_tokens: int, model: str, max_seconds: float = 1800.0,
                   progress: bool = True) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(max_seconds, connect=60.0)) as client:
        t_ref = time.monotonic()
        refs = await reference_outputs(client, pool, model, greedy_max_tokens)
        t_ref = time.monotonic() - t_ref
        before = await engine_state(client)
        gate = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(specs), desc="requests", unit="req", disable=not progress)

        async def one(spec: Spec) -> Result:
            async with gate:
                res = await send(client, spec)
            bar.update(1)
            return res

        t0 = time.monotonic()
        try:
            results = await asyncio.wait_for(asyncio.gather(*(one(s) for s in specs)), max_seconds)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the load did not finish within --max-seconds={max_seconds:g}") from None
        finally:
            bar.close()
        wall = time.monotonic() - t0
        idle, after = await wait_idle(client, timeout=60.0)
        healthy = (await client.get("/health")).status_code == 200
    return summarize(results, refs, wall, t_ref, idle, before, after, healthy, concurrency)


def summarize(results, refs, wall, t_ref, idle, before, after, healthy, concurrency) -> dict:
    categories: dict[str, int] = {}
    failures = []
    for res in results:
        cat, problems = check(res, refs)
        categories[cat] = categories.get(cat, 0) + 1
        if problems:
            failures.append({"request": res.spec.index, "path": res.spec.path, "stream": res.spec.stream,
                             "problems": problems[:3]})
    statuses: dict[str, int] = {}
    for res in results:
        key = str(res.status) if res.status is not None else "transport-error"
        statuses[key] = statuses.get(key, 0) + 1
    done = [r for r in results if r.status == 200 and not r.disconnected and not r.error]
    lat = sorted(r.latency for r in done)
    gen = sum((r.usage or {}).get("completion_tokens", 0) for r in done)
    return {
        "requests": len(results), "concurrency": concurrency, "wall_s": round(wall, 1),
        "reference_s": round(t_ref, 1), "categories": categories, "statuses": statuses,
        "num_5xx": sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500),
        "greedy_checked": sum(1 for r in results if r.spec.greedy_key is not None and not r.error),
        "completion_tokens": gen, "output_tok_s": round(gen / wall, 1) if wall else 0.0,
        "latency_p50_s": round(lat[len(lat) // 2], 2) if lat else None,
        "latency_p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None,
        "preemptions": after.get("preemptions", 0) - before.get("preemptions", 0),
        "idle_after": idle, "engine_after": after, "healthy_after": healthy,
        "failures": failures[:20], "num_failures": len(failures),
        "passed": not failures and idle and healthy,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running server (default: start one on 127.0.0.1)")
    ap.add_argument("--model", help="checkpoint for the started server (default: the embedded model)")
    ap.add_argument("--served-model-name", default="load")
    ap.add_argument("--api-key", default="load-test-key")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--disconnect-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=96, help="KV pool per group (small: forces preemption)")
    ap.add_argument("--max-words", type=int, default=120, help="longest prompt, in words")
    ap.add_argument("--max-tokens", type=int, default=48, help="longest output per choice")
    ap.add_argument("--greedy-prompts", type=int, default=24)
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="bound on the whole run")
    ap.add_argument("--json-out", help="write the report here")
    args = ap.parse_args(argv)

    sys.path.insert(0, REPO)
    server = None
    url = args.url
    if url is None:
        from herd.hub.default import default_model_path
        from tests.server_utils import RemoteServer

        server = RemoteServer(args.model or default_model_path(), [
            "--dtype", "float32", "--device", "cpu", "--block-size", str(args.block_size),
            "--num-kv-blocks", str(args.num_kv_blocks), "--max-model-len", str(args.max_model_len),
            "--served-model-name", args.served_model_name, "--disable-log-requests",
            "--disable-uvicorn-access-log", "--seed", str(args.seed)], api_key=args.api_key, timeout=300)
        url = server.url
    try:
        pool = greedy_pool(args.greedy_prompts, args.max_words, args.seed)
        specs = make_workload(args.requests, args.seed, args.served_model_name, args.max_model_len, pool=pool,
                              max_words=args.max_words, max_tokens=args.max_tokens,
                              greedy_max_tokens=args.max_tokens, disconnect_frac=args.disconnect_frac)
        report = asyncio.run(run_load(url, specs, args.concurrency, args.api_key, pool=pool,
                                      greedy_max_tokens=args.max_tokens, model=args.served_model_name,
                                      max_seconds=args.max_seconds))
    finally:
        if server is not None:
            report_exit = server.stop()
            print(f"server exit status after SIGTERM: {report_exit}")
    report["config"] = {k: v for k, v in vars(args).items() if k not in ("api_key", "json_out")}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
