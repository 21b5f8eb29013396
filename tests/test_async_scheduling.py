"""Async scheduling (--async-scheduling): step N+1 is scheduled and queued while step N runs, its
decode inputs are N's samples gathered on the device. Outputs must be the same token for token as
with synchronous scheduling, and a token sampled after a sequence stopped must never reach anyone."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from herd import LLM, SamplingParams
from herd.engine.protocol import PLACEHOLDER
from herd.engine.sampling_params import StructuredOutputsParams

PROMPTS = ["The fox", "héllo wörld, naïve café and the llamas graze in the field of experts",
           "Mixture of experts routes each token", "In the beginning was the word, and the word was with",
           "A", "The quick brown fox jumps over the lazy dog while the llamas graze on the hills"]
BASE = dict(dtype="float32", block_size=4, num_kv_blocks=128, max_model_len=160, device="cpu")


def make_llm(path, **kw):
    return LLM(path, **{**BASE, **kw})


def watch(engine) -> list:
    """Record each executed step: (its sequences, how many of its tokens are placeholders)."""
    log = []
    real = engine.executor.execute

    def execute(batch):
        log.append((list(batch.seqs), int((batch.output.cached.new_token_ids == PLACEHOLDER).sum())))
        return real(batch)

    engine.executor.execute = execute
    return log


def summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def assert_idle(engine):
    """Nothing left in flight, every KV block back in the pool."""
    sched = engine.scheduler
    assert not engine._pending and sched.num_steps_in_flight == 0 and not sched.in_flight
    assert not sched.running and not sched.waiting
    assert all(p.num_free == p.num_blocks for p in engine.block_manager.pools.values())


@pytest.fixture(scope="module")
def pair(scout_dir):
    sync, asy = make_llm(scout_dir), make_llm(scout_dir, async_scheduling=True)
    assert not sync.llm_engine.async_scheduling and asy.llm_engine.async_scheduling
    return sync, asy


@pytest.fixture(scope="module")
def free_run(pair):
    """Greedy continuations with EOS ignored: where stop tokens and strings are taken from."""
    sync, _ = pair
    return sync.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)


def test_flag_reaches_the_engine_config():
    import argparse

    from herd.engine.arg_utils import EngineArgs

    args = EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(["--async-scheduling"])
    ea = EngineArgs.from_cli_args(args)
    assert ea.async_scheduling and ea.engine_kwargs()["async_scheduling"] is True and not ea.notices()
    assert EngineArgs().async_scheduling is False  # vLLM's default


def test_greedy_matches_sync_with_stops_at_different_steps(pair, free_run):
    """Mixed prompt lengths (shorter and longer than the attention chunk), max_tokens 1 and 2, EOS and
    stop_token_ids hitting at different steps, a stop string, logprobs, prompt logprobs and n > 1."""
    sync, asy = pair
    params = [SamplingParams(temperature=0, max_tokens=1),
              SamplingParams(temperature=0, max_tokens=2, logprobs=2),
              SamplingParams(temperature=0, max_tokens=40, logprobs=1)]  # EOS or length
    for k, (o, at) in enumerate(zip(free_run[3:], (3, 7, 12))):
        ids = o.outputs[0].token_ids
        params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[ids[at]],
                                     prompt_logprobs=1 if k == 0 else None))
    prompts = list(PROMPTS)
    text = free_run[1].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    prompts.append(PROMPTS[1])
    params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    prompts.append(PROMPTS[0])
    params.append(SamplingParams(temperature=0.7, seed=11, max_tokens=10, n=2, ignore_eos=True))
    prompts += [PROMPTS[0], PROMPTS[3]]  # the model's own EOS
    params += [SamplingParams(temperature=0, max_tokens=40)] * 2

    log = watch(asy.llm_engine)
    ref = sync.generate(prompts, params, use_tqdm=False)
    got = asy.generate(prompts, params, use_tqdm=False)
    assert summary(got) == summary(ref)
    lengths = {len(o.outputs[0].token_ids) for o in ref if o.outputs[0].finish_reason == "stop"}
    assert len(lengths) >= 3  # stops at different steps
    eos = [len(o.outputs[0].token_ids) for o in ref[-2:] if o.outputs[0].finish_reason == "stop"
           and o.outputs[0].stop_reason is None]
    assert len(set(eos)) == 2  # both by EOS, at different steps
    assert ref[6].outputs[0].finish_reason == "stop" and ref[6].outputs[0].stop_reason == stop
    for r, g in zip(ref, got):
        for rc, gc in zip(r.outputs, g.outputs):
            if rc.logprobs is not None:
                assert [list(d) for d in gc.logprobs] == [list(d) for d in rc.logprobs]
                assert all(abs(gd[t].logprob - rd[t].logprob) < 1e-5
                           for rd, gd in zip(rc.logprobs, gc.logprobs) for t in rd)
        if r.prompt_logprobs is not None:
            assert [d and list(d) for d in g.prompt_logprobs] == [d and list(d) for d in r.prompt_logprobs]
    assert sum(ph for _, ph in log) > len(prompts)  # decode inputs really came from the device
    assert_idle(asy.llm_engine)


def test_min_tokens_counts_the_token_still_being_sampled(pair):
    """min_tokens ends one token before the model's EOS. The next step samples before the host has
    appended the previous token (the outputs are applied late here, so that is always so): a count
    that missed the token still being sampled would ban that EOS."""
    sync, asy = pair
    natural = sync.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    k, eos_at = next((i, len(o.outputs[0].token_ids)) for i, o in enumerate(natural)
                     if o.outputs[0].finish_reason == "stop" and len(o.outputs[0].token_ids) > 2)
    p = SamplingParams(temperature=0, max_tokens=40, min_tokens=eos_at - 1)
    ref = sync.generate(PROMPTS[k], p, use_tqdm=False)
    assert len(ref[0].outputs[0].token_ids) == eos_at and ref[0].outputs[0].finish_reason == "stop"
    sched = asy.llm_engine.scheduler
    real = sched.update_from_output

    def late(batch):
        time.sleep(0.02)  # the step queued behind this one samples meanwhile
        return real(batch)

    sched.update_from_output = late
    try:
        got = asy.generate(PROMPTS[k], p, use_tqdm=False)
    finally:
        del sched.update_from_output
    assert summary(got) == summary(ref)


def test_seeded_sampling_matches_sync(pair):
    sync, asy = pair
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7 + i, n=1 + i % 2, ignore_eos=True)
              for i in range(4)]
    ref = sync.generate(PROMPTS[:4], params, use_tqdm=False)
    got = asy.generate(PROMPTS[:4], params, use_tqdm=False)
    again = asy.generate(PROMPTS[:4], params, use_tqdm=False)
    assert summary(got) == summary(ref) == summary(again)
    assert len({tuple(c.token_ids) for c in ref[1].outputs}) == 2


def test_token_after_a_stop_is_never_emitted(pair, free_run):
    """A sequence stopped by a stop token (core) and by a stop string (output processor) has had
    one more step queued: that step runs, and its token reaches neither the stream nor the result."""
    sync, asy = pair
    eng = asy.llm_engine
    ids = free_run[1].outputs[0].token_ids
    text = free_run[2].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    reqs = {"tok": (PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               stop_token_ids=[ids[5]])),
            "str": (PROMPTS[2], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))}
    log = watch(eng)
    streamed = {rid: [] for rid in reqs}
    finished = {}
    for rid, (prompt, p) in reqs.items():
        eng.add_request(rid, prompt, p)
    seqs = {rid: eng.requests[rid].seqs[0] for rid in reqs}
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id not in finished  # nothing after the finished output
            toks = out.outputs[0].token_ids  # cumulative: each output extends the last
            assert toks[:len(streamed[out.request_id])] == streamed[out.request_id]
            streamed[out.request_id] = list(toks)
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    for rid, (prompt, p) in reqs.items():
        ref = sync.generate(prompt, p, use_tqdm=False)[0].outputs[0]
        assert ref.finish_reason == "stop" and len(ref.token_ids) < 24
        assert streamed[rid] == ref.token_ids and finished[rid].finish_reason == "stop"
        # one step per token (a prefill that samples, then decodes), plus the one queued after the stop
        steps = sum(seqs[rid] in batch for batch, _ in log)
        assert steps == len(ref.token_ids) + 1
        assert len(seqs[rid].output_token_ids) == len(ref.token_ids)
    assert_idle(eng)


def test_requests_arriving_and_aborted_mid_run(pair):
    sync, asy = pair
    eng = asy.llm_engine
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = {o.prompt: o.outputs[0].token_ids for o in sync.generate(PROMPTS[:4], p, use_tqdm=False)}
    got = {}
    eng.add_request("a", PROMPTS[0], p)
    eng.add_request("b", PROMPTS[1], p)
    for step in range(30):
        if step == 3:
            eng.add_request("c", PROMPTS[2], p)
        if step == 5:
            assert eng._pending  # a step is queued for "b" while it is aborted
            eng.abort_request("b")
        if step == 8:
            eng.add_request("d", PROMPTS[3], p)
        for out in eng.step():
            assert out.request_id != "b" or step < 5
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        if not eng.has_unfinished_requests():
            break
    assert sorted(got) == ["a", "c", "d"]
    assert [got[k] for k in "acd"] == [ref[PROMPTS[0]], ref[PROMPTS[2]], ref[PROMPTS[3]]]
    assert_idle(eng)


def test_chunked_prefill_preemption_and_prefix_caching(scout_dir):
    """Chunked prefills overlap with decodes; a small KV pool forces preemption (those steps fall
    back to synchronous scheduling); prefix-cache hits on a second pass."""
    p = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    ref = [o.outputs[0].token_ids for o in make_llm(scout_dir).generate(PROMPTS, p, use_tqdm=False)]
    chunked = make_llm(scout_dir, async_scheduling=True, max_num_batched_tokens=5, enable_prefix_caching=False)
    log = watch(chunked.llm_engine)
    assert [o.outputs[0].token_ids for o in chunked.generate(PROMPTS, p, use_tqdm=False)] == ref
    assert any(ph and len(b) > 1 for b, ph in log)
    tiny = make_llm(scout_dir, async_scheduling=True, num_kv_blocks=24, max_model_len=80,
                    enable_prefix_caching=False)
    log = watch(tiny.llm_engine)
    assert [o.outputs[0].token_ids for o in tiny.generate(PROMPTS, p, use_tqdm=False)] == ref
    assert tiny.llm_engine.scheduler.num_preemptions > 0 and sum(ph for _, ph in log) > 0
    assert_idle(tiny.llm_engine)
    cached = make_llm(scout_dir, async_scheduling=True)
    first = cached.generate(PROMPTS, p, use_tqdm=False)
    again = cached.generate(PROMPTS, p, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again] == ref
    assert max(o.num_cached_tokens for o in again) >= 8


def test_host_token_requests_fall_back_to_sync(pair, free_run):
    """Penalties, bad words and grammars read the previous tokens on the host: no step is scheduled
    ahead of theirs, and the tokens are those of synchronous scheduling."""
    sync, asy = pair
    tok = asy.get_tokenizer()
    word = tok.decode(free_run[0].outputs[0].token_ids[2:3]).strip() or "the"
    cases = [SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.5, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=12, frequency_penalty=0.8, presence_penalty=0.3,
                            ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=12, bad_words=[word], ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[a-f]{3,9}"))]
    log = watch(asy.llm_engine)
    for p in cases:
        log.clear()
        ref = sync.generate(PROMPTS[:2], p, use_tqdm=False)
        got = asy.generate(PROMPTS[:2], p, use_tqdm=False)
        assert summary(got) == summary(ref)
        assert log and all(ph == 0 for _, ph in log)
    # beside a plain request, a penalized one makes those steps synchronous, not wrong
    mixed = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), cases[0]]
    assert summary(asy.generate(PROMPTS[:2], mixed, use_tqdm=False)) == summary(
        sync.generate(PROMPTS[:2], mixed, use_tqdm=False))


def test_split_engine_core(scout_dir, tmp_path, pair, free_run):
    """The engine core's busy loop with async scheduling, behind the API server's front end (stop
    strings are found there and the core is told later)."""
    from herd.config import EngineConfig
    from herd.engine.core import EngineCoreProc
    from herd.engine.core_client import AsyncLLM, CoreGroup, CoreInfo

    sync, _ = pair
    config = EngineConfig.from_kwargs(scout_dir, async_scheduling=True, **{k: v for k, v in BASE.items()})
    in_addr, out_addr = f"ipc://{tmp_path}/core", f"ipc://{tmp_path}/client"
    core = EngineCoreProc(config, 0, in_addr, [out_addr])
    assert core.engine.async_scheduling
    log = watch(core.engine)
    loop = threading.Thread(target=core.run_busy_loop)
    loop.start()
    front = AsyncLLM(config, CoreGroup([CoreInfo(0, os.getpid(), in_addr, core.engine.num_blocks)], [out_addr],
                                       config.cache.block_size))
    text = free_run[2].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    ids = free_run[3].outputs[0].token_ids
    params = [SamplingParams(temperature=0, max_tokens=1), SamplingParams(temperature=0, max_tokens=2),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[ids[6]]),
              SamplingParams(temperature=0, max_tokens=30),
              SamplingParams(temperature=0.8, max_tokens=12, seed=3, ignore_eos=True)]

    async def run_all():
        async def one(i, p):
            final = None
            async for out in front.generate(PROMPTS[i], p, f"r{i}"):
                final = out
            return final
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(params)))

    try:
        got = asyncio.run(run_all())
    finally:
        front.shutdown()
        core.stop()
        loop.join(30)
        core.shutdown()
    ref = sync.generate(PROMPTS[:len(params)], params, use_tqdm=False)
    assert summary(got) == summary(ref)
    assert ref[2].outputs[0].stop_reason == stop and ref[3].outputs[0].stop_reason == ids[6]
    assert sum(ph for _, ph in log) > 0


def test_failed_step_leaves_nothing_in_flight(pair):
    """A step that raises while the next one is queued: both are forgotten (the one queued behind
    it is waited for, so nothing runs on the device afterwards), and the engine goes on."""
    sync, asy = pair
    eng = asy.llm_engine
    real = eng.executor.execute
    calls = []

    def execute(batch):
        calls.append(len(batch.seqs))
        if len(calls) == 3:
            raise RuntimeError("injected step failure")
        return real(batch)

    eng.executor.execute = execute
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            asy.generate(PROMPTS[:3], p, use_tqdm=False)
    finally:
        eng.executor.execute = real
    assert len(calls) == 4  # the failed step and the one queued behind it both ran to their end
    assert_idle(eng)
    assert summary(asy.generate(PROMPTS[:3], p, use_tqdm=False)) == summary(sync.generate(PROMPTS[:3], p,
                                                                                             use_tqdm=False))


def test_images_split_over_steps_scheduled_ahead(tmp_path_factory):
    """Chunked prefill over an image while other sequences decode ahead: the image rows each step
    writes start where the running steps leave off."""
    import numpy as np
    from PIL import Image

    from tests.tiny_models import make_tiny_multimodal_checkpoint

    path = make_tiny_multimodal_checkpoint(tmp_path_factory.mktemp("mm_async"), "scout")

    g = np.random.default_rng(0)
    image = Image.fromarray(g.integers(0, 256, (40, 90, 3)).astype(np.uint8))
    prompts = ["The fox and the llamas", {"prompt": "A <|image|> jumps over", "multi_modal_data": {"image": image}}]
    p = SamplingParams(temperature=0, max_tokens=8, min_tokens=8)
    kw = dict(max_num_batched_tokens=5, enable_prefix_caching=False, num_kv_blocks=256, max_model_len=200)
    ref = make_llm(path, **kw).generate(prompts, p, use_tqdm=False)
    asy = make_llm(path, async_scheduling=True, **kw)
    log = watch(asy.llm_engine)
    assert summary(asy.generate(prompts, p, use_tqdm=False)) == summary(ref)
    assert asy.llm_engine.executor.runner.encoder_cache.num_encoded == 1
    assert any(ph and len(b) > 1 for b, ph in log)
