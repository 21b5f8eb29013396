"""Hostile or unlucky requests against the engine itself (docs/reliability.md, "Attacks (engine)"):
bad_words floods, logit_bias out of range, a prompt whose prefill chunk the local KV pool cannot
hold, greedy ties."""
import json
import math
import time

import pytest
import torch

from herd import LLM, SamplingParams
from herd.engine.runner import ModelRunner
from herd.engine.sampler import Sampler, SamplingRow, greedy_argmax
from herd.engine.sampling_params import MAX_BAD_WORDS, MAX_LOGIT_BIAS, SamplingParamsError


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, **kw)


def make_llm(path, **kw):
    args = dict(dtype="float32", block_size=4, num_kv_blocks=128, max_model_len=160)
    args.update(kw)
    return LLM(path, **args)


def run_bounded(engine, max_steps):
    """Step until idle or max_steps; returns the steps taken (a hang shows as max_steps)."""
    for step in range(max_steps):
        if not engine.has_unfinished_requests():
            return step
        engine.step()
    return max_steps


# ---- 2: bad_words floods ---------------------------------------------------------------------

class _CountingTokenizer:
    """Each word is its own distinct two-token sequence: encoding is free, de-duplication is not."""

    def __init__(self):
        self.calls = 0

    def encode(self, text, add_special_tokens=False):
        self.calls += 1
        h = hash(text)
        return [h % 100_000, (h // 100_000) % 100_000]


def test_bad_words_deduplication_is_linear():
    params = SamplingParams(bad_words=["a"])
    params.bad_words = [f"word{i}" for i in range(16_000)]  # past the cap, to time the loop itself
    tok = _CountingTokenizer()
    t0 = time.perf_counter()
    params.update_from_tokenizer(tok)
    elapsed = time.perf_counter() - t0
    # the quadratic `ids not in list` loop took ~14 s for 16,000 words (32,000 sequences)
    assert elapsed < 1.0, elapsed
    assert tok.calls == 32_000
    assert len(params.bad_words_token_ids) == len({tuple(s) for s in params.bad_words_token_ids})
    # order is kept and duplicates collapse
    p = SamplingParams(bad_words=["x", "y", "x"])
    assert p.bad_words == ["x", "y"]


def test_bad_words_cost_per_step_does_not_grow_with_the_word_count():
    """The sampler looks bad words up by prefix (one dict probe per distinct prefix length) instead
    of comparing every word with the output: 64 rows x 32,000 sequences took 0.37 s a step before."""
    from herd.engine.sampler import apply_bad_words
    params = SamplingParams()
    params.bad_words = [f"word{i}" for i in range(16_000)]
    params.update_from_tokenizer(_CountingTokenizer())
    rows = [SamplingRow(params, [1], list(range(40))) for _ in range(128)]
    logits = torch.zeros(128, 100_000)
    t0 = time.perf_counter()
    apply_bad_words(logits, rows)
    assert time.perf_counter() - t0 < 0.3
    # and it still bans exactly the words whose prefix the output ends with
    p = SamplingParams(bad_words=["a"])
    p.bad_words_token_ids = [[5], [7, 8], [39, 9], [38, 39, 10], [1, 11]]
    p.bad_words_index = None  # rebuilt by the sampler from bad_words_token_ids
    x = torch.zeros(1, 20)
    apply_bad_words(x, [SamplingRow(p, [1], list(range(40)))])
    assert torch.isinf(x[0]).nonzero().flatten().tolist() == [5, 9, 10]


def test_bad_words_count_is_capped():
    ok = SamplingParams(bad_words=[f"w{i}" for i in range(MAX_BAD_WORDS)] + ["w0"])  # duplicates are free
    assert len(ok.bad_words) == MAX_BAD_WORDS
    with pytest.raises(SamplingParamsError, match=f"at most {MAX_BAD_WORDS}") as e:
        SamplingParams(bad_words=[f"w{i}" for i in range(MAX_BAD_WORDS + 1)])
    assert e.value.parameter == "bad_words" and isinstance(e.value, ValueError)
    with pytest.raises(SamplingParamsError, match="list of strings"):
        SamplingParams(bad_words=["ok", 3])


@pytest.mark.parametrize("route", ["completion", "chat"])
def test_server_and_engine_agree_on_the_bad_words_cap(route):
    """What the HTTP request models accept is what SamplingParams accepts: MAX_BAD_WORDS distinct
    words (repeats free); one more is refused by both, the server's as a 400 on `bad_words`."""
    from pydantic import ValidationError

    from herd.server.protocol import ChatCompletionRequest, CompletionRequest

    def request(words):
        if route == "chat":
            return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], bad_words=words)
        return CompletionRequest(prompt="x", bad_words=words)

    at_cap = [f"w{i}" for i in range(MAX_BAD_WORDS)] + ["w0", "w1"]
    params = request(at_cap).to_sampling_params(4, {})
    assert len(params.bad_words) == MAX_BAD_WORDS
    over = [f"w{i}" for i in range(MAX_BAD_WORDS + 1)]
    with pytest.raises(SamplingParamsError):
        SamplingParams(bad_words=over)
    with pytest.raises(ValidationError) as e:
        request(over)
    cause = e.value.errors()[0]["ctx"]["error"]
    assert cause.parameter == "bad_words" and f"at most {MAX_BAD_WORDS}" in str(cause)


def test_bad_words_at_the_cap_are_cheap_in_add_request(scout_dir):
    llm = make_llm(scout_dir)
    eng = llm.llm_engine
    words = [f"w{i} z{i}" for i in range(MAX_BAD_WORDS)]
    t0 = time.perf_counter()
    eng.add_request("bw", "The fox", greedy(4, bad_words=words))
    assert time.perf_counter() - t0 < 5.0
    assert run_bounded(eng, 20) < 20
    # the request still bans what it asked: a bad word made of the greedy first token never appears
    first = llm.generate(["The fox"], greedy(1), use_tqdm=False)[0].outputs[0].token_ids[0]
    word = llm.get_tokenizer().decode([first])
    out = llm.generate(["The fox"], greedy(1, bad_words=[word]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids[0] != first


# ---- 10: logit_bias range ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e300, -1e300, 100.5, -101, "x", None])
def test_logit_bias_out_of_range_is_rejected(value):
    with pytest.raises(SamplingParamsError, match=r"logit_bias values must be finite numbers in \[-100, 100\]") as e:
        SamplingParams(logit_bias={"5": value})
    assert e.value.parameter == "logit_bias"


def test_logit_bias_limits_and_token_ids():
    p = SamplingParams(logit_bias={"5": MAX_LOGIT_BIAS, 6: -MAX_LOGIT_BIAS, "7": 0})
    assert p.logit_bias == {5: 100.0, 6: -100.0, 7: 0.0}
    p.verify(vocab_size=320)
    for bad_id in (320, -1, 10**30):
        with pytest.raises(SamplingParamsError, match="out-of-vocab"):
            SamplingParams(logit_bias={bad_id: 1.0}).verify(vocab_size=320)
    with pytest.raises(SamplingParamsError, match="cannot be converted"):
        SamplingParams(logit_bias={"1.5x": 1.0})


def test_logit_bias_nan_from_json_is_a_400():
    """Python's json (and so the server) parses NaN / Infinity / 1e400; they must become a 400."""
    from herd.server.errors import to_openai_error
    from herd.server.protocol import CompletionRequest
    for literal in ("NaN", "Infinity", "-Infinity", "1e400", "1e300"):
        body = json.loads('{"model": "m", "prompt": "hi", "logit_bias": {"5": %s}}' % literal)
        try:
            req = CompletionRequest.model_validate(body)
            req.to_sampling_params(16, {})
        except Exception as exc:  # noqa: BLE001 - whichever layer refuses it, the answer must be a 400
            err = to_openai_error(exc) if not hasattr(exc, "errors") else None
            assert err is None or err.status == 400, (literal, exc)
        else:
            pytest.fail(f"logit_bias {literal} was accepted")


# ---- 4: a prefill chunk larger than the local pool ---------------------------------------------

def _with_pools(monkeypatch, pools):
    monkeypatch.setattr(ModelRunner, "determine_num_blocks", lambda self: dict(pools))


def test_prompt_larger_than_the_local_pool_is_chunked_not_stuck(scout_dir, monkeypatch):
    """chunk 8 / block 4: 3 local blocks suffice to decode, but a 64-token prefill step starting at
    position 0 wants 15 of them. With only 4 the prompt used to wait forever, and so did the
    2-token request queued behind it."""
    ref = make_llm(scout_dir, max_num_batched_tokens=64, enable_prefix_caching=False)
    prompt = list(range(3, 63))  # 60 tokens
    want = [o.outputs[0].token_ids for o in ref.generate([prompt, [5, 6]], greedy(6), use_tqdm=False)]
    _with_pools(monkeypatch, {"full": 40, "local": 4})
    llm = make_llm(scout_dir, max_num_batched_tokens=64, enable_prefix_caching=False)
    eng = llm.llm_engine
    eng.add_request("long", prompt, greedy(6))
    eng.add_request("short", [5, 6], greedy(6))
    states = dict(eng.requests)
    assert run_bounded(eng, 200) < 200, "the scheduler made no progress"
    got = [[*s.seqs[0].output_token_ids] for s in (states["long"], states["short"])]
    assert got == want
    assert eng.block_manager.num_free_blocks() == {"full": 40, "local": 4}


def test_prefix_cached_prompt_with_small_local_pool(scout_dir, monkeypatch):
    _with_pools(monkeypatch, {"full": 60, "local": 4})
    llm = make_llm(scout_dir, max_num_batched_tokens=32)
    eng = llm.llm_engine
    prompt = list(range(3, 50))
    outs = {}
    for rid, p in (("a", prompt), ("b", prompt), ("c", prompt[:30])):
        outs[rid] = eng.add_request(rid, p, greedy(4)).seqs[0]
        if rid != "b":
            assert run_bounded(eng, 100) < 100, "the scheduler made no progress"
    assert outs["b"].num_cached_tokens > 0  # its prefix came from the cache
    assert outs["a"].output_token_ids == outs["b"].output_token_ids
    assert eng.block_manager.num_free_blocks() == {"full": 60, "local": 4}


@pytest.mark.parametrize("block_size,chunk", [(4, 8), (3, 8), (5, 8), (16, 8)])
def test_capped_chunks_always_fit_the_minimum_pools(block_size, chunk):
    """With the start-up minimum of blocks, a sequence alone advances every step at the capped
    chunk, including chunk sizes that are not a multiple of the block size."""
    from herd.engine.block_manager import BlockManager
    from herd.engine.sequence import Sequence
    max_len = 97
    probe = BlockManager(block_size, {"full": 1, "local": 1}, chunk)
    need = probe.min_blocks_to_progress(max_len)
    for budget in (1, 7, 64):
        bm = BlockManager(block_size, dict(need), chunk, enable_prefix_caching=False)
        seq = Sequence(0, "r", 0, list(range(max_len - 1)), SamplingParams())
        steps = 0
        while seq.num_computed_tokens < seq.num_tokens:
            n = bm.max_chunk_tokens(seq, min(budget, seq.num_tokens - seq.num_computed_tokens))
            assert n >= 1 and bm.allocate_slots(seq, n), (budget, seq.num_computed_tokens)
            seq.num_computed_tokens += n
            steps += 1
        assert steps <= max_len
        bm.free(seq)
        assert bm.num_free_blocks() == need


def test_startup_refuses_pools_that_cannot_progress(scout_dir, monkeypatch):
    # chunked prefill: 3 local blocks (chunk 8 / block 4, plus one) are the minimum
    _with_pools(monkeypatch, {"full": 40, "local": 2})
    with pytest.raises(ValueError, match="too small for one sequence"):
        make_llm(scout_dir)
    _with_pools(monkeypatch, {"full": 40, "local": 3})
    make_llm(scout_dir, max_num_batched_tokens=64)
    # without chunked prefill a whole recomputed sequence is one step: local needs every block
    _with_pools(monkeypatch, {"full": 40, "local": 39})
    with pytest.raises(ValueError, match="without chunked prefill"):
        make_llm(scout_dir, enable_chunked_prefill=False)
    _with_pools(monkeypatch, {"full": 40, "local": 40})
    make_llm(scout_dir, enable_chunked_prefill=False)


# ---- 7: greedy ties ---------------------------------------------------------------------------

def test_greedy_ties_go_to_the_lowest_token_id():
    x = torch.full((4, 300), -5.0)
    x[0, [7, 3, 250]] = 2.0                  # tie: 3
    x[1, [299, 298]] = 1.0                   # tie at the end: 298
    x[2, 11] = 9.0                           # no tie
    x[3] = float("-inf")                     # everything masked: 0, like argmax
    assert greedy_argmax(x).tolist() == [3, 298, 11, 0]
    # bf16 logits are compared after the float32 upcast, ties likewise
    b = torch.zeros(2, 300, dtype=torch.bfloat16)
    b[0, [40, 20]] = 1.0
    b[1, 5] = float("nan")
    assert greedy_argmax(b).tolist()[0] == 20
    rows = [SamplingRow(greedy(1), [1], []) for _ in range(2)]
    assert Sampler()(x[:2].clone(), rows).sampled_token_ids == [3, 298]


def test_greedy_float32_batched_equals_alone(scout_dir):
    """float32: a request's greedy tokens do not depend on its batch neighbours, chunking or
    preemption (the bf16 figures are in the doc, not guaranteed)."""
    prompts = [[3 + (7 * i + j) % 300 for j in range(5 + 3 * i)] for i in range(6)]
    alone_llm = make_llm(scout_dir, enable_prefix_caching=False)
    alone = [alone_llm.generate([p], greedy(12), use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    busy = make_llm(scout_dir, num_kv_blocks=16, max_model_len=64, max_num_batched_tokens=7,
                    enable_prefix_caching=False)
    outs = busy.generate(prompts, greedy(12), use_tqdm=False)
    assert busy.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone


# ---- the bf16 figures of docs/reliability.md ---------------------------------------------------

def greedy_divergence(path, dtype: str, n: int = 64, new_tokens: int = 24, seed: int = 0) -> dict:
    """Greedy requests alone vs all at once in a small pool (chunked prefills, mixed batches,
    preemption): how many requests' token ids differ, and at how many tied top logits (float32 view
    of the logits) the alone run sampled."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (int(torch.randint(2, 40, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]
    alone_llm = make_llm(path, dtype=dtype, enable_prefix_caching=False)
    params = greedy(new_tokens, logprobs=2)
    alone = [alone_llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    busy = make_llm(path, dtype=dtype, num_kv_blocks=40, max_model_len=80, max_num_batched_tokens=37,
                    enable_prefix_caching=False)
    outs = [o.outputs[0] for o in busy.generate(prompts, params, use_tqdm=False)]
    ties = sum(1 for o in alone for t, lp in zip(o.token_ids, o.logprobs)
               if sum(1 for v in lp.values() if v.rank == 1) > 1 or
               len({round(v.logprob, 6) for v in lp.values()}) < len(lp))
    gaps = []  # alone run's top-1 minus top-2 logprob where a differing request first departs
    for a, b in zip(alone, outs):
        if a.token_ids != b.token_ids:
            i = next(k for k, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y)
            top = sorted((v.logprob for v in a.logprobs[i].values()), reverse=True)
            gaps.append(round(top[0] - top[1], 4))
    return dict(dtype=dtype, requests=n, differ=len(gaps), first_departure_top2_gaps=gaps,
                alone_top2_ties=ties, preemptions=busy.llm_engine.scheduler.num_preemptions)


if __name__ == "__main__":  # python -m tests.test_attacks_engine [--old-argmax]
    import sys
    import tempfile

    import herd.engine.sampler as sampler_mod
    from tests.tiny_models import make_tiny_checkpoint
    if "--old-argmax" in sys.argv:
        sampler_mod.greedy_argmax = lambda x: x.argmax(dim=-1)
    torch.set_num_threads(1)
    ckpt = make_tiny_checkpoint(tempfile.mkdtemp(), "scout")
    for dt in ("float32", "bfloat16"):
        print(greedy_divergence(ckpt, dt), flush=True)
