"""Tensor parallelism on CPU (gloo, 2 ranks): the same greedy tokens and logprobs as one rank, with
TP and with expert parallelism, weights sliced per rank, fail-fast on a dead worker, FP8 (dynamic,
INC static) and per-rank INC measurements under TP, `herd serve -tp 2`, the Ray backend."""
import dataclasses
import json
import os
import signal
import threading
import time

import pytest
import torch

from herd import LLM, SamplingParams
from herd.config import EngineConfig
from herd.parallel.distributed_executor import ExecutorError
from herd.parallel.executor import check_shardable, make_executor

PROMPTS = ["The fox", "héllo wörld, naïve café and the llamas graze in the field of experts",
           "Mixture of experts routes each token", "In the beginning was the word, and the word was with"]
N_NEW = 12


def params():
    """Greedy with logprobs and prompt logprobs, plus one seeded random row (sampled on rank 0)."""
    greedy = SamplingParams(temperature=0, max_tokens=N_NEW, min_tokens=N_NEW, logprobs=2, prompt_logprobs=1)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=N_NEW, min_tokens=N_NEW)
    return [greedy, greedy, seeded, greedy]


def make_llm(path, **kw):
    args = dict(dtype="float32", block_size=4, num_kv_blocks=96, max_model_len=96)
    args.update(kw)
    return LLM(path, **args)


def num_params(llm) -> int:
    return sum(p.numel() for p in llm.llm_engine.executor.runner.model.parameters())


def assert_same_outputs(outs, ref):
    for o, r in zip(outs, ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for d, dr in zip(o.outputs[0].logprobs or [], r.outputs[0].logprobs or []):
            assert set(d) == set(dr)
            for tok in d:
                assert abs(d[tok].logprob - dr[tok].logprob) < 1e-4
        for d, dr in zip(o.prompt_logprobs or [], r.prompt_logprobs or []):
            if dr is not None:
                assert set(d) == set(dr)
                assert all(abs(d[t].logprob - dr[t].logprob) < 1e-4 for t in d)


@pytest.mark.parametrize("ckpt, expert_parallel", [("scout_dir", False), ("maverick_dir", True)],
                         ids=["scout-tp", "maverick-ep"])
def test_tp2_matches_tp1(request, ckpt, expert_parallel):
    """TP on Scout (all-MoE layers), expert parallelism on Maverick (dense and MoE layers)."""
    path = request.getfixturevalue(ckpt)
    one = make_llm(path)
    ref, full_params = one.generate(PROMPTS, params(), use_tqdm=False), num_params(one)
    # a token budget of 7 splits prompts into chunked prefills mixed with decodes
    llm = make_llm(path, tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
                   max_num_batched_tokens=7)
    try:
        ex = llm.llm_engine.executor
        assert [p.is_alive() for p in ex.procs] == [True] and ex.procs[0].pid != os.getpid()
        outs = llm.generate(PROMPTS, params(), use_tqdm=False)
        assert_same_outputs(outs, ref)
        assert not torch.distributed.is_initialized()  # groups are per engine, not torch's global one
        assert all(len(o.prompt_logprobs) == len(o.prompt_token_ids) for o in outs[:2])
        # each rank holds its slice only: well under the whole model on rank 0
        assert num_params(llm) < 0.6 * full_params
        layer = ex.runner.model.model.layers[0]
        assert layer.self_attn.qkv_proj.weight.shape[0] == (2 + 1 + 1) * 16
        experts = next(m for m in ex.runner.model.modules() if hasattr(m, "expert_map"))
        if expert_parallel:
            assert experts.num_local_experts == 2 and experts.expert_map.tolist() == [0, 1, -1, -1]
        else:
            assert experts.num_local_experts == 4 and experts.w13_weight.shape[1] == 96
    finally:
        llm.llm_engine.shutdown()
    assert not any(p.is_alive() for p in ex.procs)


def test_worker_killed_mid_generation_fails_fast_with_the_rank(scout_dir):
    llm = make_llm(scout_dir, tensor_parallel_size=2)
    ex = llm.llm_engine.executor
    long = SamplingParams(temperature=0, max_tokens=60, min_tokens=60)
    engine, steps = llm.llm_engine, []
    original = engine.step

    def step():  # kill rank 1 while generation is under way (mid-step or between steps)
        steps.append(1)
        if len(steps) == 3:
            threading.Timer(0.05, os.kill, (ex.procs[0].pid, signal.SIGKILL)).start()
        return original()
    engine.step = step
    start = time.monotonic()
    with pytest.raises(ExecutorError, match=r"rank 1 \(pid \d+\) died unexpectedly \(killed by SIGKILL\)"):
        llm.generate(PROMPTS, long, use_tqdm=False)
    assert time.monotonic() - start < 15
    assert 3 <= len(steps) < 60
    assert not any(p.is_alive() for p in ex.procs)
    with pytest.raises(ExecutorError, match="has stopped"):
        engine.check_health()
    with pytest.raises(ExecutorError, match="has stopped"):
        llm.generate(["The fox"], long, use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_bad_parallel_settings_fail_before_any_worker_starts(scout_dir):
    start = time.monotonic()
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        make_llm(scout_dir, tensor_parallel_size=3)
    assert time.monotonic() - start < 2
    cfg = EngineConfig.from_kwargs(scout_dir, dtype="float32", tensor_parallel_size=2,
                                   distributed_executor_backend="uni", device="cpu")
    with pytest.raises(ValueError, match="'uni' runs one rank"):
        make_executor(cfg)
    cfg = EngineConfig.from_kwargs(scout_dir, tensor_parallel_size=4, enable_expert_parallel=True, device="cpu")
    cfg.model.hf_config = dataclasses.replace(cfg.model.hf_config, num_local_experts=6)
    with pytest.raises(ValueError, match="num_local_experts=6 is not divisible by tensor_parallel_size=4"):
        check_shardable(cfg)


def test_ray_backend_matches_tp1(scout_dir):
    pytest.importorskip("ray", reason="Ray is optional (pip install 'herd[ray]'); the ray backend is not tested")
    import ray
    ref = make_llm(scout_dir).generate(PROMPTS, params(), use_tqdm=False)
    # A private local instance: the executor would otherwise join any cluster running on this host.
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        llm = make_llm(scout_dir, tensor_parallel_size=2, distributed_executor_backend="ray")
        try:
            assert_same_outputs(llm.generate(PROMPTS, params(), use_tqdm=False), ref)
            ex = llm.llm_engine.executor
            pid = ray.get(ex.actors[0].pid.remote())
            assert pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(ExecutorError, match="rank 1"):
                llm.generate(["The fox"], SamplingParams(max_tokens=2), use_tqdm=False)
            assert time.monotonic() - start < 10
        finally:
            llm.llm_engine.shutdown()
        assert ray.is_initialized()  # the executor leaves a Ray instance it did not start alone
    finally:
        ray.shutdown()


def teacher_forced_error(llm, seqs, ref) -> float:
    """Mean |logprob - ref| of the given token sequences (prompt logprobs: no sampling involved)."""
    outs = llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    got = [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs]
    diffs = [abs(a - b) for g, r in zip(got, ref) for a, b in zip(g, r)]
    return sum(diffs) / len(diffs)


@pytest.fixture(scope="module")
def scout_fp32(scout_dir):
    """Prompt + greedy continuation of the fp32 model, and its logprob of each of those tokens."""
    llm = make_llm(scout_dir)
    greedy = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    seqs = [{"prompt_token_ids": o.prompt_token_ids + o.outputs[0].token_ids}
            for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    outs = llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return seqs, [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs]


def test_dynamic_fp8_under_tp_is_as_accurate_as_one_rank(scout_dir, scout_fp32):
    """Per-rank shards get their own FP8 scales, so TP=2 is not bit-equal to TP=1, but as close to
    the unquantized model."""
    seqs, ref = scout_fp32
    err1 = teacher_forced_error(make_llm(scout_dir, quantization="fp8"), seqs, ref)
    llm = make_llm(scout_dir, quantization="fp8", tensor_parallel_size=2)
    try:
        qkv = llm.llm_engine.executor.runner.model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight.shape == (64, 64)
        err2 = teacher_forced_error(llm, seqs, ref)
    finally:
        llm.llm_engine.shutdown()
    assert 0 < err1 < 0.2 and 0 < err2 < 1.5 * err1 + 0.01


def inc_config(path, mode: str, prefix) -> str:
    none = {"types": [], "names": []}
    cfg = {"method": "HOOKS", "mode": mode, "observer": "maxabs", "allowlist": none, "blocklist": none,
           "dump_stats_path": str(prefix)}
    cfg.update({"quantize_weight": False} if mode == "MEASURE" else {"scale_method": "maxabs_hw"})
    path.write_text(json.dumps(cfg))
    return str(path)


def test_inc_per_rank_measurements_unify_and_quantize_under_tp(scout_dir, scout_fp32, tmp_path):
    """INC MEASURE under TP=2 writes one file per rank; unified to 1 rank they hold the TP=1 values;
    QUANTIZE under TP=2 reads its rank's file and is as accurate as TP=1."""
    from herd.quant.inc.unify import load_rank_set, unify

    def measure(tp: int):
        prefix = tmp_path / f"tp{tp}" / "inc_output"
        cfg = inc_config(tmp_path / f"measure_tp{tp}.json", "MEASURE", prefix)
        llm = make_llm(scout_dir, quantization="inc", quant_config_path=cfg, tensor_parallel_size=tp)
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
        return prefix, [os.path.basename(str(p)) for p in llm.llm_engine.shutdown()]

    p1, _ = measure(1)
    p2, written = measure(2)
    assert {"inc_output_hooks_maxabs_0_2.npz", "inc_output_hooks_maxabs_1_2.npz"} <= set(written)
    ranks = load_rank_set(p2, 2)
    assert [r.local_rank for r in ranks] == [0, 1]
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert ranks[0].nodes[qkv].weight != ranks[1].nodes[qkv].weight  # each rank measured its own slice
    (tp1,) = load_rank_set(p1, 1)
    (unified,) = unify(ranks, 1)
    assert set(unified.nodes) == set(tp1.nodes)
    for name, want in tp1.nodes.items():
        got = unified.nodes[name]
        assert got.inputs == pytest.approx(want.inputs, rel=1e-4, abs=1e-6), name
        if want.weight is not None:
            assert got.weight == pytest.approx(want.weight, rel=1e-6), name
    # static FP8 with each rank's own scales, FP8 KV cache included
    seqs, ref = scout_fp32
    errs = []
    for tp, prefix in ((1, p1), (2, p2)):
        cfg = inc_config(tmp_path / f"quant_tp{tp}.json", "QUANTIZE", prefix)
        llm = make_llm(scout_dir, quantization="inc", quant_config_path=cfg, kv_cache_dtype="fp8_inc",
                       tensor_parallel_size=tp)
        try:
            assert llm.llm_engine.executor.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
            errs.append(teacher_forced_error(llm, seqs, ref))
        finally:
            llm.llm_engine.shutdown()
    assert 0 < errs[0] < 0.3 and 0 < errs[1] < 1.5 * errs[0] + 0.01


def spawned_children(pid: int) -> list[int]:
    """Worker processes (multiprocessing spawn) started by `pid` (Linux /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(k) for k in f.read().split()]
    out = []
    for k in kids:
        with open(f"/proc/{k}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                out.append(k)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the server's worker through /proc (Linux)")
def test_server_tp2_ep_matches_tp1_and_exits_nonzero_when_a_worker_dies(scout_dir):
    import httpx

    from tests.server_utils import RemoteServer
    prompt = "The quick brown fox jumps over"
    want = make_llm(scout_dir).generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                        use_tqdm=False)[0].outputs[0].text
    srv = RemoteServer(scout_dir, ["--dtype", "float32", "--block-size", "4", "--num-kv-blocks", "96",
                                   "--max-model-len", "96", "--device", "cpu", "--tensor-parallel-size", "2",
                                   "--enable-expert-parallel", "--disable-log-stats", "--served-model-name", "tiny"])
    try:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        (child,) = spawned_children(srv.proc.pid)  # the engine core process, whose worker is rank 1
        (worker,) = spawned_children(child) or (child,)  # (in process: the server's own worker)
        os.kill(worker, signal.SIGKILL)
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code >= 500
        codes = []  # after the failure /health never says healthy again, and the server goes away
        deadline = time.monotonic() + 15
        while srv.proc.poll() is None and time.monotonic() < deadline:
            try:
                codes.append(httpx.get(srv.url + "/health", timeout=1).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        assert srv.proc.wait(5) != 0
        assert set(codes) <= {503}
        assert "rank 1" in srv.read_log()
    finally:
        srv.stop()
