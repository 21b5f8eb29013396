"""The fast path against its references: persistent input batch vs the scheduler's view, attention
backends vs the reference backend end to end, and a forward with no graph break or host read."""
import pickle

import numpy as np
import pytest
import torch

from herd import LLM, SamplingParams
from herd.engine.block_manager import LOCAL

PROMPTS = ["The fox", "héllo wörld, naïve café and the llamas graze in the field of experts",
           "Mixture of experts routes each token", "In the beginning was the word, and the word was with"]


def greedy(n=24):
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n)


def make_llm(path, **kw):
    args = dict(dtype="float32", block_size=4, num_kv_blocks=128, max_model_len=160)
    args.update(kw)
    return LLM(path, **args)


def check_input_batch(engine):
    """The runner's persistent buffers hold exactly what the scheduler knows of every live sequence."""
    ib = engine.executor.runner.input_batch
    live = {s.seq_id: s for s in engine.scheduler.running}
    # finished and preempted sequences leave the runner with the next step's diff
    assert set(ib.row_of) - set(engine.scheduler.tracker.removed) == set(live)
    for sid, seq in live.items():
        row = ib.row_of[sid]
        assert ib.num_computed[row] == seq.num_computed_tokens
        n = int(ib.num_tokens[row])
        # the token sampled by the last step reaches the runner with the next step's diff
        assert ib.token_ids[row, :n].tolist() == seq.all_token_ids[:n] and n >= seq.num_tokens - 1
        for g, table in seq.block_tables.items():
            assert ib.tables[g][row, :ib.table_lens[g][row]].tolist() == table


@pytest.mark.parametrize("fixture", ["scout_dir", "maverick_dir"])
def test_persistent_batch_tracks_the_scheduler(fixture, request):
    """Chunked prefill, prefix caching, local-block release and preemption (a pool too small for
    every sequence at once) all keep the runner's buffers in step with the scheduler."""
    llm = make_llm(request.getfixturevalue(fixture), num_kv_blocks=40, max_num_batched_tokens=16)
    eng = llm.llm_engine
    prompts = PROMPTS + [PROMPTS[3] + " the herd"]  # shares a prefix with PROMPTS[3]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, greedy(30))
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        check_input_batch(eng)
        steps += 1
    assert eng.scheduler.num_preemptions > 0
    assert any(-1 in t for t in eng.executor.runner.input_batch.tables[LOCAL].tolist())  # released blocks
    ib = eng.executor.runner.input_batch
    assert set(ib.row_of) <= set(eng.scheduler.tracker.removed)
    eng.add_request("last", PROMPTS[0], greedy(2))
    eng.step()  # the finished sequences' rows come back with the next step
    assert len(ib) == 1 and len(ib.free_rows) == len(ib.num_tokens) - 1


@pytest.mark.parametrize("fixture", ["scout_dir", "maverick_dir"])
def test_backends_match_reference_end_to_end(fixture, request):
    path = request.getfixturevalue(fixture)
    kw = dict(max_num_batched_tokens=12, num_kv_blocks=60)  # mixed prefill chunks + decodes, preemption
    ref = make_llm(path, attention_backend="reference", **kw).generate(PROMPTS, greedy(), use_tqdm=False)
    # Triton (interpreted on the CPU: ~40 s a run) on the Scout-like model only: the Maverick-like
    # one has the same attention layers, it differs in its FFNs (dense / MoE interleave)
    for backend in ("sdpa", "triton") if fixture == "scout_dir" else ("sdpa",):
        if backend == "triton":
            pytest.importorskip("triton")
        outs = make_llm(path, attention_backend=backend, **kw).generate(PROMPTS, greedy(), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref], backend


def test_decode_diffs_are_small(scout_dir):
    """A decode step sends each runner one token per sequence, not its token list."""
    llm = make_llm(scout_dir, max_num_seqs=64, num_kv_blocks=4096, max_model_len=512,
                   max_num_batched_tokens=8192)
    eng = llm.llm_engine
    for i in range(64):
        eng.add_request(str(i), {"prompt_token_ids": list(range(3, 3 + 60 + i % 5))}, greedy(8))
    eng.step()  # prefills
    batch = eng.scheduler.schedule()
    out = batch.output
    assert not out.new_seqs and len(out.cached.seq_ids) == 64 and (out.cached.new_token_ids >= 0).all()
    assert len(pickle.dumps(out)) < 2560  # about 24 bytes per sequence + fixed overhead
    eng.executor.execute(batch)


@pytest.mark.parametrize("fixture", ["scout_dir", "maverick_dir"])
def test_forward_has_no_graph_break_or_host_read(fixture, request):
    """torch.compile(fullgraph=True) fails on any graph break, and a device-to-host read (.item(),
    .tolist(), bool(t), int(t)) inside the forward is one: prefill, mixed and decode steps.
    Each new step structure is a compile of its own (~8 s), so the workload has just three: two
    prompts (5 and 44 tokens) under a 25-token budget prefill together (5 + 20), then one decode
    runs beside the long prompt's last chunk (1 + 24), then both decode and finish together."""
    torch._dynamo.reset()
    path = request.getfixturevalue(fixture)
    prompts = PROMPTS[:2]
    params = [greedy(6), greedy(5)]
    llm = make_llm(path, max_num_batched_tokens=25)
    model = llm.llm_engine.executor.runner.model
    eager = model.forward
    calls = []

    def forward(*args, **kw):
        calls.append(args[0].shape[0])
        return compiled(*args, **kw)

    compiled = torch.compile(eager, fullgraph=True, backend="eager", dynamic=True)
    model.forward = forward
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        model.forward = eager
    assert calls[:2] == [25, 25] and set(calls[2:]) == {2}  # prefills, mixed, decode-only steps
    ref = make_llm(path, max_num_batched_tokens=25).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]


@pytest.mark.parametrize("fixture", ["scout_dir", "maverick_dir"])
def test_compiled_decode_matches_eager(fixture, request):
    """enforce_eager=False with a compilation level: decode steps padded to capture sizes and run
    compiled (the dynamo 'eager' backend keeps compile time out of CI; inductor is the default)."""
    torch._dynamo.reset()
    path = request.getfixturevalue(fixture)
    prompts = PROMPTS + ["A", "The herd grazes"]  # 6 sequences: padded to the capture size 8
    eager = make_llm(path, enforce_eager=True).generate(prompts, greedy(), use_tqdm=False)
    llm = make_llm(path, compilation_config={"level": 3, "backend": "eager"})
    graphs = llm.llm_engine.executor.runner.decode_graphs
    assert graphs is not None and graphs.mode == "compile"
    ran = []
    run = graphs.run
    graphs.run = lambda si: ran.append(len(si.rows)) or run(si)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert ran and max(ran) == len(prompts)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in eager]
    assert make_llm(path).llm_engine.executor.runner.decode_graphs is None  # CPU: compile only when asked


def test_compiled_decode_compiles_once_per_capture_size(scout_dir):
    """The KV window grows with the sequences (power-of-two buckets of blocks): it is compiled as a
    symbolic size, so longer sequences at the same batch size never recompile."""
    torch._dynamo.reset()
    prompts = PROMPTS[:2]
    llm = make_llm(scout_dir, compilation_config={"level": 3, "backend": "eager", "cudagraph_capture_sizes": [1, 2]})
    sizes = []
    run = llm.llm_engine.executor.runner.decode_graphs.run
    llm.llm_engine.executor.runner.decode_graphs.run = lambda si: sizes.append(len(si.rows)) or run(si)
    for batch in (prompts, prompts[:1]):                      # windows of 2-4 blocks of 4 tokens
        llm.generate(batch, greedy(4), use_tqdm=False)
    assert set(sizes) == {1, 2}
    eager = make_llm(scout_dir, enforce_eager=True)
    with torch.compiler.set_stance("fail_on_recompile"):      # up to 29 blocks: widths 8, 16, 32
        for batch in (prompts, prompts[1:]):
            outs = llm.generate(batch, greedy(100), use_tqdm=False)
            ref = eager.generate(batch, greedy(100), use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]


def test_enforce_eager_and_compilation_flags():
    from herd.config import CompilationConfig
    assert CompilationConfig.parse("3").level == 3
    assert CompilationConfig.parse('{"level": 1, "backend": "eager"}').backend == "eager"
    assert CompilationConfig.parse({"mode": 2}).level == 2
    assert CompilationConfig.parse(None).capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert CompilationConfig.parse(None).capture_sizes(40, "cpu") == [1, 2, 4, 8, 16, 32, 40]
    assert CompilationConfig.parse(None).capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    cc = CompilationConfig.parse('{"level": 3, "inductor_compile_config": {"max_autotune": false}}')
    opts = cc.inductor_options("cpu")
    assert opts["freezing"] and opts["max_autotune"] is False and opts["max_autotune_gemm_backends"] == "CPP,ATEN"
    assert cc.inductor_options("cuda") == {"max_autotune": False}
    with pytest.raises(ValueError, match="inductor_compile_config must be a JSON object"):
        CompilationConfig.parse({"inductor_compile_config": ["freezing"]})
    with pytest.raises(ValueError, match="unknown compilation config keys"):
        CompilationConfig.parse({"levle": 3})
    with pytest.raises(ValueError, match="neither a level nor a JSON object"):
        CompilationConfig.parse("fast")


def test_fp8_kv_backends_match_reference(scout_dir):
    kw = dict(max_num_batched_tokens=12, kv_cache_dtype="fp8")
    ref = make_llm(scout_dir, attention_backend="reference", **kw).generate(PROMPTS, greedy(12), use_tqdm=False)
    for backend in ("sdpa", "triton"):
        if backend == "triton":
            pytest.importorskip("triton")
        outs = make_llm(scout_dir, attention_backend=backend, **kw).generate(PROMPTS, greedy(12), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref], backend


def test_decode_buckets_cover_every_row_once():
    from herd.attention.backends.sdpa.backend import BUCKET_MIN_SAVING_TOKENS, decode_buckets

    assert [b.tolist() for b in decode_buckets(np.array([3, 3, 3]), 16)] == [[0, 1, 2]]
    # one long sequence among many short ones: padding them all to its width would cost more keys
    # than one more SDPA call, so it gets a bucket of its own
    widths = np.array([1] * 40 + [200] + [2] * 3)
    buckets = decode_buckets(widths, 16)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(widths)))
    assert [40] in [b.tolist() for b in buckets] and len(buckets) == 2
    # a small saving is not worth a call: one bucket
    few = np.array([1, 2, 3])
    assert len(decode_buckets(few, 16)) == 1 and 3 * 2 * 16 < BUCKET_MIN_SAVING_TOKENS


def test_sdpa_decode_buckets_match_reference(scout_dir, monkeypatch):
    """Decodes of very different lengths run in several SDPA buckets (forced here by a zero
    threshold) and still match the reference backend token for token."""
    from herd.attention.backends.sdpa import backend as sdpa_backend

    monkeypatch.setattr(sdpa_backend, "BUCKET_MIN_SAVING_TOKENS", 1)
    seen = []
    real = sdpa_backend.decode_buckets

    def counting(widths, block_size):
        buckets = real(widths, block_size)
        seen.append(len(buckets))
        return buckets

    monkeypatch.setattr(sdpa_backend, "decode_buckets", counting)
    prompts = [PROMPTS[0], PROMPTS[1] * 5, PROMPTS[2], PROMPTS[3] * 3]
    kw = dict(max_model_len=400, num_kv_blocks=400)
    ref = make_llm(scout_dir, attention_backend="reference", **kw).generate(prompts, greedy(), use_tqdm=False)
    outs = make_llm(scout_dir, attention_backend="sdpa", **kw).generate(prompts, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert max(seen) >= 3
