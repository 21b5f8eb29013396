"""Engine end to end on tiny checkpoints: greedy parity with transformers' generate, logprobs,
prefix caching, preemption, chunked prefill, seeds, stop conditions."""
import pytest
import torch

from herd import LLM, SamplingParams
from tests.tiny_models import load_hf

PROMPTS = ["The fox", "héllo wörld, naïve café and the llamas graze in the field of experts",
           "Mixture of experts routes each token", "In the beginning was the word, and the word was with"]
N_NEW = 32


def greedy(n=N_NEW, **kw):
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, **kw)


def make_llm(path, **kw):
    args = dict(dtype="float32", block_size=4, num_kv_blocks=128, max_model_len=160)
    args.update(kw)
    return LLM(path, **args)


@pytest.fixture(scope="module", params=["scout_dir", "maverick_dir"])
def ckpt(request):
    path = request.getfixturevalue(request.param)
    hf = load_hf(path)
    llm = make_llm(path)
    ref_outs = llm.generate(PROMPTS, greedy(logprobs=2), use_tqdm=False)
    return path, hf, llm, ref_outs


def test_greedy_matches_transformers_generate(ckpt):
    path, hf, llm, outs = ckpt
    lens = [len(o.prompt_token_ids) for o in outs]
    assert max(lens) > 2 * 8 and min(lens) < 8  # prompts shorter and longer than the attention chunk
    for o in outs:
        ids = torch.tensor([o.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
        assert o.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()
        assert o.outputs[0].finish_reason == "length"


def test_logprobs_match_transformers(ckpt):
    path, hf, llm, outs = ckpt
    for o in outs:
        full = torch.tensor([o.prompt_token_ids + o.outputs[0].token_ids])
        with torch.no_grad():
            lp = torch.log_softmax(hf(input_ids=full).logits[0].float(), -1)
        P = len(o.prompt_token_ids)
        for i, (tok, d) in enumerate(zip(o.outputs[0].token_ids, o.outputs[0].logprobs)):
            row = lp[P - 1 + i]
            assert abs(d[tok].logprob - row[tok].item()) < 1e-3
            assert d[tok].rank == int((row > row[tok]).sum()) + 1
            top2 = row.topk(2).indices.tolist()
            assert set(top2) <= set(d)
            assert d[tok].decoded_token is not None


def test_prefix_caching_and_preemption_and_chunked_prefill_keep_outputs(ckpt):
    path, hf, llm, ref = ckpt
    expected = [o.outputs[0].token_ids for o in ref]
    # prefix caching: the second pass hits the cache and produces the same tokens
    again = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert max(o.num_cached_tokens for o in again) >= 8
    no_cache = make_llm(path, enable_prefix_caching=False)
    outs = no_cache.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.num_cached_tokens == 0 for o in outs)
    # a KV pool that fits about one sequence at a time forces preemption by recompute
    tiny = make_llm(path, num_kv_blocks=24, max_model_len=80, enable_prefix_caching=False)
    outs = tiny.generate(PROMPTS, greedy(), use_tqdm=False)
    assert tiny.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    # a token budget of 5 splits every prompt into chunked prefills mixed with decodes
    chunked = make_llm(path, max_num_batched_tokens=5, enable_prefix_caching=False)
    outs = chunked.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_prompt_logprobs_match_transformers(scout_dir):
    hf = load_hf(scout_dir)
    llm = make_llm(scout_dir, max_num_batched_tokens=6)  # prompt logprobs across prefill chunks
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    ids = out.prompt_token_ids
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert abs(out.prompt_logprobs[i][ids[i]].logprob - lp[i - 1, ids[i]].item()) < 1e-3


def test_seeded_sampling_is_reproducible(scout_dir):
    llm = make_llm(scout_dir)
    p = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True)
    a = llm.generate(PROMPTS[:2], p, use_tqdm=False)
    b = llm.generate(PROMPTS[:1], p, use_tqdm=False)  # different batch neighbours
    c = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=16, seed=99, ignore_eos=True),
                     use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert a[0].outputs[0].token_ids != c[0].outputs[0].token_ids
    n2 = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=5, ignore_eos=True),
                      use_tqdm=False)[0]
    assert len(n2.outputs) == 3 and [c.index for c in n2.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in n2.outputs}) > 1


def test_stop_conditions(scout_dir):
    llm = make_llm(scout_dir)
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    # stop_token_ids: stops at the first occurrence, reports it as stop_reason, keeps it in token_ids
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    o = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                    stop_token_ids=[tok]),
                     use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == tok and o.token_ids == base.token_ids[:first + 1]
    # max_tokens
    o = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 3
    # stop string taken from the generated text itself
    text = base.text
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip() and
                 text.find(text[i:i + 2]) == i), None)
    assert stop is not None
    if stop:
        o = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
                         use_tqdm=False)[0].outputs[0]
        assert o.finish_reason == "stop" and o.stop_reason == stop
        assert o.text == text[:text.index(stop)]
        o = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                                                    include_stop_str_in_output=True),
                         use_tqdm=False)[0].outputs[0]
        assert o.text == text[:text.index(stop) + len(stop)]


def test_prompt_forms_and_errors(scout_dir):
    llm = make_llm(scout_dir)
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[2])
    a = llm.generate({"prompt_token_ids": ids}, greedy(4), use_tqdm=False)[0]
    b = llm.generate(PROMPTS[2], greedy(4), use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.prompt_token_ids == ids
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        llm.generate({"prompt_token_ids": [3] * 200}, greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate({"prompt_token_ids": [10_000]}, greedy(4), use_tqdm=False)
    # the engine stays usable after bad input
    assert llm.generate(PROMPTS[2], greedy(4), use_tqdm=False)[0].outputs[0].token_ids == b.outputs[0].token_ids


def test_chat_uses_checkpoint_template(scout_dir):
    llm = make_llm(scout_dir)
    msgs = [{"role": "system", "content": " be brief "}, {"role": "user", "content": "hello"}]
    out = llm.chat(msgs, greedy(4), use_tqdm=False)[0]
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert text == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nbe brief<|eot|>"
                    "<|header_start|>user<|header_end|>\n\nhello<|eot|><|header_start|>assistant<|header_end|>\n\n")
    assert len(out.outputs[0].token_ids) == 4


def test_local_blocks_are_released_as_sequences_advance(scout_dir):
    llm = make_llm(scout_dir, enable_prefix_caching=False)
    eng = llm.llm_engine
    eng.add_request("r", PROMPTS[1], greedy(40))
    seq = eng.requests["r"].seqs[0]
    eng.step()  # the whole prompt in one step: every chunk's blocks are needed at once
    held_after_prefill = len([b for b in seq.block_tables["local"] if b >= 0])
    peak_decode = 0
    while eng.has_unfinished_requests():
        eng.step()
        if not seq.is_finished:
            peak_decode = max(peak_decode, len([b for b in seq.block_tables["local"] if b >= 0]))
            assert len(seq.block_tables["full"]) == -(-seq.num_computed_tokens // 4)
    # chunk 8 / block 4: while decoding a sequence holds at most 3 local blocks; full keeps them all
    assert held_after_prefill == -(-seq.num_prompt_tokens // 4) > 3
    assert 0 < peak_decode <= 3
    assert eng.block_manager.num_free_blocks() == {"full": 128, "local": 128}


def test_request_metrics_snapshot_is_an_independent_equal_copy():
    import dataclasses

    from herd.engine.outputs import RequestMetrics

    m = RequestMetrics(arrival_time=1.0, first_token_time=2.5, num_preemptions=3)
    snap = m.snapshot()
    assert snap == m and snap is not m and type(snap) is RequestMetrics
    assert dataclasses.asdict(snap) == dataclasses.asdict(m)
    m.last_token_time = 9.0
    assert snap.last_token_time is None
