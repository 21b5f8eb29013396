"""Sampler pipeline and SamplingParams: every parameter has a test that fails if it is ignored."""
import math

import pytest
import torch

import herd.engine.sampler as sampler_mod
from herd.engine.sampler import (Sampler, SamplingRow, apply_penalties, compute_prompt_logprobs,
                                 make_generator)
from herd.engine.sampling_params import SamplingParams, SamplingParamsError

sampler = Sampler()


def row(params=None, prompt=(), output=(), generator=None, eos=()):
    return SamplingRow(params or SamplingParams(), list(prompt), list(output), generator, set(eos))


def run(logits, rows):
    logits = torch.as_tensor(logits, dtype=torch.float32).clone()
    return sampler(logits.unsqueeze(0) if logits.dim() == 1 else logits, rows)


def freqs(logits, params, n=4000, vocab=None):
    """Empirical token frequencies from n identical rows sampled in one batch."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    batch = logits.expand(n, -1).clone()
    out = sampler(batch, [row(params) for _ in range(n)]).sampled_token_ids
    return torch.bincount(torch.tensor(out), minlength=logits.shape[0]).float() / n


LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0]


# ---- greedy / temperature / filters ------------------------------------------------------------

def test_greedy_is_argmax_and_mixes_with_random_rows():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    rows = [row(SamplingParams(temperature=0.0)) if i % 2 == 0 else row() for i in range(6)]
    out = run(logits, rows).sampled_token_ids
    assert [out[i] for i in (0, 2, 4)] == logits.argmax(-1)[[0, 2, 4]].tolist()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_distribution(temperature):
    torch.manual_seed(1)
    got = freqs(LOGITS, SamplingParams(temperature=temperature))
    want = torch.softmax(torch.tensor(LOGITS) / temperature, -1)
    assert torch.allclose(got, want, atol=0.03)
    assert not torch.allclose(got, torch.softmax(torch.tensor(LOGITS), -1), atol=0.03)


def test_top_k():
    torch.manual_seed(2)
    got = freqs(LOGITS, SamplingParams(top_k=2))
    want = torch.softmax(torch.tensor(LOGITS[:2]), -1)
    assert got[2:].sum() == 0
    assert torch.allclose(got[:2], want, atol=0.03)
    assert (freqs(LOGITS, SamplingParams(top_k=-1))[2:] > 0).all()


def test_top_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    torch.manual_seed(3)
    got = freqs(logits, SamplingParams(top_p=0.7))
    assert got[2:].sum() == 0 and got[1] > 0.3  # {0.5, 0.3} is the smallest set reaching 0.7
    assert torch.allclose(got[:2], torch.tensor([0.625, 0.375]), atol=0.03)
    got = freqs(logits, SamplingParams(top_p=0.85))
    assert got[3] == 0 and got[2] > 0.1


def test_top_k_then_top_p_on_renormalized_probs():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    torch.manual_seed(13)
    assert freqs(logits, SamplingParams(top_k=2), n=500)[1] > 0.2
    assert freqs(logits, SamplingParams(top_p=0.6), n=500)[1] > 0.2
    # After top-k the pair is renormalized to (0.625, 0.375), so top-p 0.6 keeps token 0 only.
    got = freqs(logits, SamplingParams(top_k=2, top_p=0.6), n=500)
    assert got[0] == 1.0


def test_min_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    torch.manual_seed(4)
    got = freqs(logits, SamplingParams(min_p=0.2))  # keep p >= 0.1
    assert got[3] == 0 and got[2] > 0.1
    got = freqs(logits, SamplingParams(min_p=0.5))  # keep p >= 0.25
    assert got[2:].sum() == 0 and got[1] > 0.3


def test_filters_differ_per_row_in_one_batch():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(3000, -1).clone()
    rows = [row(SamplingParams(top_k=1)) if i % 3 == 0 else
            row(SamplingParams(top_p=0.7)) if i % 3 == 1 else row() for i in range(3000)]
    torch.manual_seed(5)
    out = torch.tensor(sampler(logits, rows).sampled_token_ids)
    assert (out[0::3] == 0).all()
    assert out[1::3].max() == 1
    assert out[2::3].max() == 3


# ---- seeds -------------------------------------------------------------------------------------

def _seeded_run(seed, neighbours, position, steps=8, vocab=1000):
    gen = make_generator(seed)
    tokens = []
    for step in range(steps):
        logits = torch.zeros(neighbours + 1, vocab)
        rows = [row(SamplingParams(top_p=0.9)) for _ in range(neighbours)]
        rows.insert(position, row(SamplingParams(seed=seed), generator=gen))
        if neighbours:
            rows[(position + 1) % len(rows)] = row(SamplingParams(seed=99),
                                                   generator=make_generator(99 + step))
        tokens.append(sampler(logits, rows).sampled_token_ids[position])
    return tokens


def test_seed_reproducible_and_independent_of_batch():
    alone = _seeded_run(1234, neighbours=0, position=0)
    torch.manual_seed(7)
    crowded = _seeded_run(1234, neighbours=5, position=3)
    torch.manual_seed(8)
    other_spot = _seeded_run(1234, neighbours=2, position=0)
    assert alone == crowded == other_spot
    assert _seeded_run(1235, neighbours=0, position=0) != alone


def test_unseeded_rows_use_global_rng():
    logits = torch.zeros(1, 1000)
    draws = {tuple(run(logits, [row()]).sampled_token_ids) for _ in range(5)}
    assert len(draws) > 1


def test_n_children_get_distinct_seeds():
    parent = SamplingParams(n=3, seed=10, temperature=0.8)
    children = [parent.for_child(i) for i in range(3)]
    assert [c.seed for c in children] == [10, 11, 12] and all(c.n == 1 for c in children)
    assert parent.n == 3 and parent.seed == 10
    logits = torch.zeros(3, 1000)
    rows = [row(c, generator=make_generator(c.seed)) for c in children]
    assert len(set(sampler(logits, rows).sampled_token_ids)) == 3
    assert SamplingParams(n=2).for_child(1).seed is None


# ---- penalties ---------------------------------------------------------------------------------

GREEDY = dict(temperature=0.0)


def test_presence_penalty_uses_output_not_prompt():
    logits = [1.0, 0.9, -5.0]
    assert run(logits, [row(SamplingParams(**GREEDY), output=[0])]).sampled_token_ids == [0]
    p = SamplingParams(presence_penalty=0.5, **GREEDY)
    assert run(logits, [row(p, output=[0])]).sampled_token_ids == [1]
    assert run(logits, [row(p, prompt=[0, 0])]).sampled_token_ids == [0]


def test_frequency_penalty_counts_occurrences():
    logits = [1.0, 0.9, -5.0]
    p = SamplingParams(frequency_penalty=0.05, **GREEDY)
    assert run(logits, [row(p, output=[0])]).sampled_token_ids == [0]  # 0.95 > 0.9
    assert run(logits, [row(p, output=[0, 0, 0])]).sampled_token_ids == [1]  # 0.85 < 0.9
    assert run(logits, [row(p, prompt=[0, 0, 0])]).sampled_token_ids == [0]


def test_repetition_penalty_prompt_and_output_both_signs():
    p = SamplingParams(repetition_penalty=1.5, **GREEDY)
    assert run([2.0, 1.5], [row(p, prompt=[0])]).sampled_token_ids == [1]  # 2/1.5 < 1.5
    assert run([2.0, 1.5], [row(p, output=[0])]).sampled_token_ids == [1]
    assert run([2.0, 1.5], [row(p, output=[1])]).sampled_token_ids == [0]
    assert run([-1.0, -1.2], [row(p, output=[0])]).sampled_token_ids == [1]  # -1.5 < -1.2


def test_penalties_match_formula():
    torch.manual_seed(9)
    logits = torch.randn(2, 8)
    rows = [row(SamplingParams(repetition_penalty=1.3, presence_penalty=0.4,
                               frequency_penalty=0.2), prompt=[1, 2], output=[2, 3, 3]),
            row()]
    got = logits.clone()
    apply_penalties(got, rows)
    want = logits.clone()
    for t in (1, 2, 3):
        x = want[0, t]
        want[0, t] = x / 1.3 if x > 0 else x * 1.3
    want[0, 2] -= 0.2 * 1 + 0.4
    want[0, 3] -= 0.2 * 2 + 0.4
    assert torch.allclose(got, want)


# ---- token constraints -------------------------------------------------------------------------

def test_logit_bias():
    logits = [1.0, 0.0, 0.5]
    p = SamplingParams(logit_bias={"1": 2.0}, **GREEDY)  # JSON-style string key
    assert run(logits, [row(p)]).sampled_token_ids == [1]
    p = SamplingParams(logit_bias={0: -100.0}, **GREEDY)
    assert run(logits, [row(p)]).sampled_token_ids == [2]


def test_allowed_token_ids():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = SamplingParams(allowed_token_ids=[2, 4], **GREEDY)
    both = logits.expand(2, -1)
    assert run(both, [row(p), row(SamplingParams(**GREEDY))]).sampled_token_ids == [2, 0]
    torch.manual_seed(10)
    got = freqs(logits, SamplingParams(allowed_token_ids=[1, 3]), n=500)
    assert set(torch.nonzero(got).flatten().tolist()) == {1, 3}


def test_min_tokens_masks_eos_and_stop_ids():
    logits = [0.0, 5.0, 4.0, 3.0]  # 1 = EOS, 2 = a stop token id
    p = SamplingParams(min_tokens=2, stop_token_ids=[2], **GREEDY)
    assert run(logits, [row(p, output=[0], eos=[1])]).sampled_token_ids == [3]
    assert run(logits, [row(p, output=[0, 0], eos=[1])]).sampled_token_ids == [1]
    # ignore_eos does not lift the mask during min_tokens (vLLM masks all_stop_token_ids).
    p = SamplingParams(min_tokens=2, ignore_eos=True, **GREEDY)
    assert run(logits, [row(p, eos=[1])]).sampled_token_ids == [2]


def test_generation_config_eos_ids_and_ignore_eos():
    gen_cfg = {"eos_token_id": [7, 8, 9]}
    p = SamplingParams(stop_token_ids=[3], min_tokens=1, **GREEDY)
    p.update_from_generation_config(gen_cfg, eos_token_id=9)
    assert p.eos_token_id == 9 and p.stop_token_ids == [3, 7, 8]
    assert p.all_stop_token_ids == {3, 7, 8, 9}
    q = SamplingParams(ignore_eos=True, min_tokens=1, **GREEDY)
    q.update_from_generation_config(gen_cfg, eos_token_id=9)
    assert q.eos_token_id is None and q.stop_token_ids == []
    assert q.all_stop_token_ids == {7, 8, 9}
    logits = torch.arange(10, dtype=torch.float32)  # 9 > 8 > 7 > ...
    assert run(logits, [row(q)]).sampled_token_ids == [6]  # still masked during min_tokens
    assert run(logits, [row(q, output=[0])]).sampled_token_ids == [9]


def test_bad_words():
    class Tok:  # "ab" -> [1, 2], " ab" -> [5]
        def encode(self, text, add_special_tokens=False):
            return {"ab": [1, 2], " ab": [5]}[text]

    p = SamplingParams(bad_words=["ab"], **GREEDY)
    p.update_from_tokenizer(Tok())
    assert p.bad_words_token_ids == [[1, 2], [5]]
    logits = [0.0, 1.0, 3.0, 2.0, 0.0, 4.0]
    assert run(logits, [row(p, output=[0])]).sampled_token_ids == [2]  # " ab" banned
    assert run(logits, [row(p, output=[1])]).sampled_token_ids == [3]  # "b" after "a" banned


# ---- logprobs ----------------------------------------------------------------------------------

def test_logprobs_from_raw_logits_with_ranks():
    torch.manual_seed(11)
    logits = torch.randn(3, 40)
    raw = torch.log_softmax(logits, -1)
    params = [SamplingParams(logprobs=3, temperature=0.7, top_k=5, presence_penalty=1.0),
              SamplingParams(),
              SamplingParams(logprobs=0, repetition_penalty=2.0)]
    rows = [row(params[0], output=[int(logits[0].argmax())]), row(params[1]),
            row(params[2], prompt=[1, 2, 3])]
    out = run(logits, rows)
    assert out.logprobs[1] is None
    for i in (0, 2):
        tok = out.sampled_token_ids[i]
        d = out.logprobs[i]
        assert math.isclose(d[tok].logprob, raw[i, tok].item(), abs_tol=1e-5)
        assert d[tok].rank == 1 + int((raw[i] > raw[i, tok]).sum())
        assert d[tok].decoded_token is None
    assert list(out.logprobs[2]) == [out.sampled_token_ids[2]]
    top = raw[0].topk(3)
    tok0 = out.sampled_token_ids[0]
    for j, (lp, t) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
        assert math.isclose(out.logprobs[0][t].logprob, lp, abs_tol=1e-5)
        if t != tok0:
            assert out.logprobs[0][t].rank == j + 1
    assert len(out.logprobs[0]) == 3 + (tok0 not in top.indices.tolist())


def test_logprobs_whole_vocab():
    logits = torch.randn(1, 16)
    out = run(logits, [row(SamplingParams(logprobs=-1))])
    assert len(out.logprobs[0]) == 16
    assert sorted(lp.rank for t, lp in out.logprobs[0].items()
                  if t != out.sampled_token_ids[0]) == [r for r in range(1, 17)
                  if r != out.logprobs[0][out.sampled_token_ids[0]].rank]
    assert run(logits, [row()]).logprobs is None


def test_prompt_logprobs(monkeypatch):
    monkeypatch.setattr(sampler_mod, "_PROMPT_LOGPROBS_CHUNK", 2)  # exercise chunking
    torch.manual_seed(12)
    logits = torch.randn(5, 20)
    nxt = [3, 0, 19, 7, 7]
    got = compute_prompt_logprobs(logits, nxt, 2)
    raw = torch.log_softmax(logits, -1)
    assert len(got) == 5
    for t, d in enumerate(got):
        assert math.isclose(d[nxt[t]].logprob, raw[t, nxt[t]].item(), abs_tol=1e-5)
        assert d[nxt[t]].rank == 1 + int((raw[t] > raw[t, nxt[t]]).sum())
        assert set(d) == set(raw[t].topk(2).indices.tolist()) | {nxt[t]}
    with pytest.raises(ValueError, match="logits rows"):
        compute_prompt_logprobs(logits, nxt[:3], 2)


def test_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="expected logits"):
        run(torch.zeros(2, 4), [row()])


# ---- SamplingParams ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be non-negative, got -0.5"),
    ({"n": 0}, "n must be at least 1, got 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k must be 0 \\(disable\\), -1 \\(disable\\), or at least 1, got -2"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
    ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\], got -3"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero, got 0.0"),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be less than or equal to max_tokens=4, got 5"),
    ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1"),
    ({"stop": ["ok", ""]}, "stop cannot contain an empty string"),
    ({"logprobs": -2}, "logprobs must be non-negative or -1, got -2"),
    ({"temperature": 0.0, "n": 2}, "n must be 1 when using greedy sampling, got 2"),
    ({"allowed_token_ids": []}, "allowed_token_ids is not None and empty"),
    ({"logit_bias": {"x": 1.0}}, "cannot be converted to integer"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalization():
    p = SamplingParams(stop="###", stop_token_ids=[5, 5, 6], seed=-1, temperature=0.001,
                       logit_bias={"3": 1})
    assert p.stop == ["###"] and p.stop_token_ids == [5, 6] and p.seed is None
    assert p.temperature == 0.01 and p.logit_bias == {3: 1.0}
    assert p.output_text_buffer_length == 2 and p.all_stop_token_ids == {5, 6}
    g = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.3)
    assert g.is_greedy and (g.top_k, g.top_p, g.min_p) == (0, 1.0, 0.0)
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_sampling_params_verify_limits():
    SamplingParams(logprobs=20, prompt_logprobs=20).verify(vocab_size=100)
    with pytest.raises(SamplingParamsError, match="Requested sample logprobs of 21, which is "
                                                  "greater than max allowed: 20") as e:
        SamplingParams(logprobs=21).verify(vocab_size=100)
    assert e.value.parameter == "logprobs"
    with pytest.raises(ValueError, match="Requested prompt logprobs of 100"):
        SamplingParams(prompt_logprobs=-1).verify(vocab_size=100)
    SamplingParams(logprobs=-1).verify(vocab_size=100, max_logprobs=-1)
    SamplingParams(logprobs=30).verify(vocab_size=100, max_logprobs=30)
    with pytest.raises(ValueError, match=r"token_id\(s\) \[100\] in logit_bias"):
        SamplingParams(logit_bias={100: 1.0}).verify(vocab_size=100)
    with pytest.raises(ValueError, match="in allowed_token_ids"):
        SamplingParams(allowed_token_ids=[-1]).verify(vocab_size=100)
    with pytest.raises(ValueError, match="in stop_token_ids"):
        SamplingParams(stop_token_ids=[200]).verify(vocab_size=100)
    with pytest.raises(ValueError, match="top_k cannot be greater"):
        SamplingParams(top_k=101).verify(vocab_size=100)
