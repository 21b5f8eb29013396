"""Fuzzing `herd serve` on 127.0.0.1: no input may produce a 5xx, every error is the OpenAI error
body, and every success is a well-formed response (SSE streams end with [DONE]).

Two generators, both deterministic (hypothesis derandomized):
  * schemathesis from the server's own OpenAPI schema: schema-valid and schema-violating bodies
    for every operation (the `model` field is pinned to the served name half of the time so that
    generation paths are reached);
  * a request generator that knows the API: mostly-valid completion and chat requests with random
    combinations of sampling options, streaming, logprobs, echo, stop strings, n, token-id prompts.

CI runs a few hundred cases of each; the full campaign is
    python tests/test_fuzz.py --schema-cases 2000 --api-cases 500
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st

if __name__ == "__main__":  # run as a script from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.server_utils import RemoteServer  # noqa: E402

API_KEY = "sk-fuzz"
MODEL = "fuzz"
MAX_MODEL_LEN = 96
VOCAB = 320  # tests.tiny_models
SERVER_ARGS = ["--dtype", "float32", "--device", "cpu", "--block-size", "4", "--num-kv-blocks", "128",
               "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", MODEL, "--max-request-body-bytes",
               "262144", "--disable-log-requests", "--disable-uvicorn-access-log", "--disable-log-stats",
               "--seed", "0"]
CASE_TIMEOUT = 60.0


@dataclass
class Campaign:
    name: str
    statuses: Counter = field(default_factory=Counter)
    problems: list = field(default_factory=list)
    timeouts: int = 0
    seconds: float = 0.0

    @property
    def cases(self) -> int:
        return sum(self.statuses.values()) + self.timeouts

    def summary(self) -> dict:
        return {"campaign": self.name, "cases": self.cases, "seconds": round(self.seconds, 1),
                "statuses": dict(sorted(self.statuses.items())), "timeouts": self.timeouts,
                "num_5xx": sum(n for s, n in self.statuses.items() if s >= 500),
                "problems": self.problems[:10], "num_problems": len(self.problems)}


# ---- response checks ------------------------------------------------------------------------

def error_body_problem(status: int, content: bytes) -> str | None:
    try:
        body = json.loads(content)
    except ValueError:
        return f"{status} body is not JSON: {content[:120]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if (not isinstance(err, dict) or set(body) != {"error"} or set(err) != {"message", "type", "param", "code"}
            or err["code"] != status or not isinstance(err["message"], str) or not isinstance(err["type"], str)):
        return f"{status} body is not an OpenAI error: {content[:200]!r}"
    return None


def sse_problem(content: bytes) -> str | None:
    events = [e for e in content.decode("utf-8").split("\n\n") if e]
    if not events or events[-1] != "data: [DONE]":
        return f"stream does not end with [DONE]: {content[-120:]!r}"
    finished: Counter = Counter()
    for e in events[:-1]:
        if not e.startswith("data: "):
            return f"not an SSE data event: {e[:80]!r}"
        chunk = json.loads(e[6:])
        if "error" in chunk:
            return f"error inside the stream: {chunk['error']}"
        for c in chunk.get("choices", []):
            if c.get("finish_reason"):
                finished[c["index"]] += 1
    if any(v != 1 for v in finished.values()):
        return f"a choice finished more than once: {dict(finished)}"
    return None


def response_problem(status: int, content_type: str, content: bytes) -> str | None:
    if status >= 500:
        return f"server error {status}: {content[:300]!r}"
    if status >= 400:
        return error_body_problem(status, content)
    if content_type.startswith("text/event-stream"):
        return sse_problem(content)
    if content_type.startswith("application/json"):
        try:
            json.loads(content)
        except ValueError:
            return f"200 body is not JSON: {content[:120]!r}"
    return None


# ---- schemathesis ---------------------------------------------------------------------------

def schema_campaign(url: str, cases: int, api_key: str = API_KEY, model: str = MODEL) -> Campaign:
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=schemathesis.Config())
    strategy = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)
    camp = Campaign("schemathesis")
    headers = {"Authorization": f"Bearer {api_key}"}

    @settings(max_examples=cases, deadline=None, derandomize=True, database=None, verbosity=Verbosity.quiet,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy, pin_model=st.booleans())
    def one(case, pin_model):
        if pin_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        try:
            r = case.call(base_url=url, headers=headers, timeout=CASE_TIMEOUT)
        except Exception as e:  # requests' timeout and connection errors
            if "timed out" in str(e).lower():
                camp.timeouts += 1
            else:
                camp.problems.append(f"{case.method} {case.path}: {type(e).__name__}: {e}")
            return
        camp.statuses[r.status_code] += 1
        ctype = (r.headers.get("content-type") or [""])[0]
        problem = response_problem(r.status_code, ctype, r.content)
        if problem:
            camp.problems.append(f"{case.method} {case.path} {str(case.body)[:300]}: {problem}")

    t0 = time.monotonic()
    one()
    camp.seconds = time.monotonic() - t0
    return camp


# ---- API-aware generator ----------------------------------------------------------------------

_text = st.one_of(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24),
                  st.lists(st.sampled_from(["the", "herd", " llama", "café", "日本", "🙂", "\n", "<|eot|>"]),
                           max_size=8).map("".join))
_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)


def _options(chat: bool):
    opt = {
        "max_tokens": st.one_of(st.integers(1, 10), st.sampled_from([0, -3, MAX_MODEL_LEN, 10 ** 20])),
        "n": st.integers(1, 3), "temperature": st.one_of(st.sampled_from([0.0, 0.7, 1.0]), st.floats(0, 4)),
        "top_p": st.floats(0.05, 1.0), "top_k": st.integers(-1, VOCAB + 5), "min_p": st.floats(0, 1),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.5, 2.0), "seed": st.integers(-1, 2 ** 40),
        "stop": st.one_of(_text.filter(bool), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
        "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
        "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=3),
        "ignore_eos": st.booleans(), "min_tokens": st.integers(0, 4), "include_stop_str_in_output": st.booleans(),
        "skip_special_tokens": st.booleans(), "allowed_token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                                             max_size=6),
        "bad_words": st.lists(st.text(min_size=1, max_size=4), max_size=2), "echo": st.booleans(),
        "prompt_logprobs": st.integers(0, 3), "return_tokens_as_token_ids": st.booleans(),
        "stream": st.booleans(), "stream_options": st.fixed_dictionaries(
            {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}),
    }
    if chat:
        opt.update(logprobs=st.booleans(), top_logprobs=st.integers(0, 4), add_generation_prompt=st.booleans(),
                   continue_final_message=st.booleans(), max_completion_tokens=st.integers(1, 8))
    else:
        opt.update(logprobs=st.integers(0, 5))
    return opt


_content = st.one_of(_text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
                                     min_size=1, max_size=2))
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "narrator"]),
                                  "content": _content})


def _mostly_coherent(body: dict) -> dict:
    """Keep conflicting stream options only where `stream` is absent, so most requests get past
    validation (the absent case still exercises the 400)."""
    if body.get("stream") is False:
        body.pop("stream_options", None)
    elif body.get("stream"):
        body.pop("prompt_logprobs", None)
    return body


completion_requests = st.fixed_dictionaries(
    {"prompt": st.one_of(_text, _ids, st.lists(_text, min_size=1, max_size=3), st.lists(_ids, min_size=1,
                                                                                        max_size=3))},
    optional=_options(chat=False)).map(_mostly_coherent)
chat_requests = st.fixed_dictionaries({"messages": st.lists(_message, min_size=1, max_size=3)},
                                      optional=_options(chat=True)).map(_mostly_coherent)


def request_problem(path: str, body: dict, r: httpx.Response) -> str | None:
    """Beyond well-formedness: a 200 has one finished choice per sample, and with ignore_eos and no
    stop conditions exactly the asked-for tokens."""
    problem = response_problem(r.status_code, r.headers.get("content-type", ""), r.content)
    if problem or r.status_code != 200:
        return problem
    if r.status_code == 200 and not body.get("stream") and body.get("max_tokens", 0) > 0:
        out = r.json()
        prompts = body.get("prompt")
        num = len(prompts) if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else 1
        choices = out["choices"]
        if len(choices) != num * body.get("n", 1) or any(c["finish_reason"] not in ("length", "stop")
                                                         for c in choices):
            return f"choices {[(c['index'], c['finish_reason']) for c in choices]} for {num} prompt(s)"
        plain = (body.get("ignore_eos") and not body.get("stop") and not body.get("stop_token_ids")
                 and "max_completion_tokens" not in body)
        if plain and out["usage"]["completion_tokens"] != len(choices) * body["max_tokens"]:
            return f"usage {out['usage']} for {len(choices)} choices of {body['max_tokens']} tokens"
    return None


def api_campaign(url: str, cases: int, api_key: str = API_KEY, model: str = MODEL) -> Campaign:
    camp = Campaign("api-aware")
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=CASE_TIMEOUT)

    @settings(max_examples=cases, deadline=None, derandomize=True, database=None, verbosity=Verbosity.quiet,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(req=st.one_of(completion_requests.map(lambda b: ("/v1/completions", b)),
                         chat_requests.map(lambda b: ("/v1/chat/completions", b))))
    def one(req):
        path, body = req
        body = {"model": model, **body}
        try:
            r = http.post(path, json=body)
        except httpx.TimeoutException:
            camp.timeouts += 1
            return
        except httpx.HTTPError as e:
            camp.problems.append(f"{path} {json.dumps(body)[:300]}: {type(e).__name__}: {e}")
            return
        camp.statuses[r.status_code] += 1
        problem = request_problem(path, body, r)
        if problem:
            camp.problems.append(f"{path} {json.dumps(body, ensure_ascii=False)[:400]}: {problem}")

    t0 = time.monotonic()
    try:
        one()
    finally:
        http.close()
    camp.seconds = time.monotonic() - t0
    return camp


def server_is_idle(url: str, timeout: float = 30.0) -> bool:
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while True:
        samples = {}
        for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
            for s in fam.samples:
                samples[(s.name, s.labels.get("group"))] = s.value
        free = {g: v for (n, g), v in samples.items() if n == "herd:kv_cache_free_blocks"}
        total = {g: v for (n, g), v in samples.items() if n == "herd:kv_cache_total_blocks"}
        idle = samples[("vllm:num_requests_running", None)] == 0 and free == total
        if idle or time.monotonic() > deadline:
            return idle and httpx.get(url + "/health", timeout=10).status_code == 200
        time.sleep(0.1)


# ---- CI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(scout_dir):
    srv = RemoteServer(scout_dir, SERVER_ARGS, api_key=API_KEY)
    yield srv
    srv.stop()


def _assert_clean(camp: Campaign, min_cases: int):
    summary = camp.summary()
    assert camp.cases >= min_cases and not camp.problems and camp.timeouts == 0, summary
    assert summary["num_5xx"] == 0 and camp.statuses[200] > 0 and camp.statuses[400] > 0, summary


def test_schemathesis_finds_no_server_errors(server):
    camp = schema_campaign(server.url, 600)  # the full campaign: python tests/test_fuzz.py
    _assert_clean(camp, 600)
    assert server_is_idle(server.url)


def test_api_aware_fuzzing_finds_no_server_errors(server):
    camp = api_campaign(server.url, 150)
    _assert_clean(camp, 150)
    assert camp.statuses[200] >= 30  # generation paths were reached, not just validation
    assert server_is_idle(server.url)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the full fuzzing campaign against a fresh tiny server")
    ap.add_argument("--schema-cases", type=int, default=2000)
    ap.add_argument("--api-cases", type=int, default=500)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    import tempfile

    from tests.tiny_models import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        srv = RemoteServer(make_tiny_checkpoint(tmp, "scout"), SERVER_ARGS, api_key=API_KEY, timeout=300)
        try:
            camps = [schema_campaign(srv.url, args.schema_cases), api_campaign(srv.url, args.api_cases)]
            idle = server_is_idle(srv.url)
        finally:
            status = srv.stop()
    report = {"campaigns": [c.summary() for c in camps], "idle_and_healthy_after": idle,
              "server_exit_status": status}
    report["passed"] = idle and all(not c.problems and not c.timeouts for c in camps)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
