"""Host time per herd engine step: 256 sequences decoding at 8k context, with the model forward
replaced by a no-op (it returns a fixed random [tokens, hidden] tensor), so what is left is the
engine's own work on the host: scheduling (and the per-step diffs for the runners), the runner's
input preparation (persistent batch update + flattened step inputs), attention metadata (host
arrays -> tensors, backend plan), logits and sampling, and the engine's bookkeeping after the
step. Also measured: the bytes a tensor-parallel executor sends each worker per step (the pickle
of the message herd's mp executor broadcasts) and the time to pickle it.

How: --num-seqs (256) prompts of --context (8192) random tokens are prefilled with the no-op
forward (random hidden states, not zeros: all-equal logits would send greedy sampling down its
tie-breaking path on every row; the KV cache is not written, which no host code reads), then
--warmup-steps decode steps, then --steps (32) measured decode steps. Sequences admitted first
decode while the others prefill, so the prefill runs --prefill-prompts-per-step (2) whole prompts
per step (max_num_batched_tokens = 2 x --context unless given, and KV room for those chunks):
128 prefill steps for 256 sequences, every context between --context and --context + ~170.
With --real-forward-steps N (default 2) the real forward is put back for N more decode steps, to
compare host time with model time at that context (the cache holds zeros there: the arithmetic
is the same).

With --async-scheduling (herd's engine flag) step N+1 is scheduled while step N runs on the engine's
device thread: the parts overlap and their timers mix two threads, so compare the first row (the
wall time of each engine.step(), one step per call in the steady state) between runs with and
without the flag. --generate-prompts N adds the throughput of LLM.generate over N random prompts
(--generate-prompt-len, --generate-max-tokens, real forward) on two fresh engines, synchronous and
async scheduling, in --generate-rounds interleaved rounds.

The KV pool is sized for all sequences at full length plus those prefill chunks
(cpu_kv_cache_space_gib computed from the model config, unless --cpu-kv-cache-space or
--num-kv-blocks is given), so nothing is preempted; the script warns if sequences are missing.
The default model is herd's embedded one (herd/assets/default, 4 layers, bf16): one global layer
holds the 8k context, the three chunked layers only their window.

Engine internals used by this script are all in `attach_probe` (one small function, to adapt when
the engine changes); everything else is the public engine API.

    python benchmarks/host_overhead.py [--model DIR] [--num-seqs 256] [--context 8192] [--steps 32]
        [--warmup-steps 4] [--real-forward-steps 2] [--threads 2] [--quick] [--output-json FILE]
        [--generate-prompts N --generate-prompt-len 128 --generate-max-tokens 64 --generate-rounds 5]
        [herd engine flags: --max-num-batched-tokens, --block-size, --enable-prefix-caching, ...]
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cpu_common as C  # noqa: E402

C.preset_threads()
# herd's embedded model was trained to 2,048 positions; this script measures host time only (the
# forward is a no-op but for --real-forward-steps, whose outputs are not used), so 8k contexts are
# allowed on purpose
os.environ.setdefault("HERD_ALLOW_LONG_MAX_MODEL_LEN", "1")


# ---- engine internals: everything this script touches inside herd is here --------------------

class Probe:
    """Timers around engine internals, the no-op forward switch and the TP message size."""

    def __init__(self):
        self.times: dict[str, list[float]] = defaultdict(list)
        self.msg_bytes: list[int] = []
        self.msg_pickle_s: list[float] = []
        self.noop = True
        self.missing: list[str] = []
        self.notes: list[str] = []
        self.recording = False

    def reset(self):
        self.times.clear()
        self.msg_bytes.clear()
        self.msg_pickle_s.clear()


def attach_probe(llm) -> Probe:
    """Wrap (as instance attributes, so nothing in herd changes) these internals of the current
    engine (persistent input batch + scheduler diffs):

      engine.scheduler.schedule()           "schedule"  scheduling and building the step's diffs
      engine.executor.execute(batch)        "execute"   the whole runner call; before it, the TP
                                                        message ("execute_model", (batch.output,),
                                                        False) is pickled as MultiprocExecutor.
                                                        _send_step does (not counted in "execute")
      runner.input_batch.update(sched)      "prepare_inputs"  diffs -> persistent batch
      runner.input_batch.prepare(sched)     "prepare_inputs"  persistent batch -> step arrays
      runner.build_metadata(si)             "metadata"  numpy -> tensors, attention backend plan
      runner.model.forward(...)             "forward"   no-op while probe.noop: a fixed random
                                                        [T, hidden] tensor (made once per size)
      runner.model.compute_logits(h)        "logits"
      runner.sampler(logits, rows)          "sample"
      runner.decode_graphs                  must be None: a compiled decode would bypass the no-op

    (runner = engine.executor.runner, engine = llm.llm_engine). A missing attribute is skipped
    and listed in probe.missing."""
    import torch

    probe = Probe()
    engine = llm.llm_engine
    runner = getattr(engine.executor, "runner", None)

    def timed(obj, attr, label, before=None):
        fn = getattr(obj, attr, None) if obj is not None else None
        if fn is None:
            probe.missing.append(f"{type(obj).__name__}.{attr}")
            return

        def wrapper(*a, **k):
            if before is not None:
                before(*a, **k)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if probe.recording:
                    probe.times[label].append(time.perf_counter() - t)
        setattr(obj, attr, wrapper)

    def tp_message(batch, *a, **k):
        if not probe.recording:
            return
        t = time.perf_counter()
        data = pickle.dumps(("execute_model", (batch.output,), False), protocol=pickle.HIGHEST_PROTOCOL)
        probe.msg_pickle_s.append(time.perf_counter() - t)
        probe.msg_bytes.append(len(data))

    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.executor, "execute", "execute", before=tp_message)
    if runner is None:
        probe.missing.append("executor.runner")
        return probe
    ib = getattr(runner, "input_batch", None)
    timed(ib, "update", "prepare_inputs")
    timed(ib, "prepare", "prepare_inputs")
    timed(runner, "build_metadata", "metadata")
    timed(runner.model, "compute_logits", "logits")
    timed(runner, "sampler", "sample")
    real_forward = runner.model.forward
    hidden = runner.hf_config.hidden_size
    # Fixed random rows, not zeros: zero hidden states give all-equal logits, and greedy sampling
    # then takes its (rare, slower) tie-breaking path on every row.
    fake = {"h": torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)).to(runner.dtype)}

    def forward(input_ids, *a, **k):
        t = time.perf_counter()
        try:
            if probe.noop:
                T = input_ids.shape[0]
                if fake["h"].shape[0] < T:
                    g = torch.Generator().manual_seed(T)
                    fake["h"] = torch.randn(T, hidden, generator=g).to(runner.dtype).to(input_ids.device)
                return fake["h"][:T]
            return real_forward(input_ids, *a, **k)
        finally:
            if probe.recording:
                probe.times["forward"].append(time.perf_counter() - t)
    runner.model.forward = forward
    if getattr(runner, "decode_graphs", None) is not None:
        probe.notes.append("compiled decode is on (runner.decode_graphs): the no-op forward does not apply "
                           "to compiled decode steps; run with --enforce-eager")
    return probe


# ---- the benchmark -----------------------------------------------------------------------------

def kv_space_gib(path: str, dtype_bytes: int, num_seqs: int, max_len: int, block_size: int,
                 context: int, prompts_per_step: int) -> float:
    """CPU KV pool for num_seqs sequences of max_len, plus room for the prefill chunks. The runner
    splits the pool so that both KV groups run out together, in proportion to one sequence's
    blocks: global layers hold every token, chunked layers their window (chunk rounded up to
    blocks, plus one block). A prefill chunk of a whole prompt, though, holds local blocks for all
    of its positions during its step, so the pool is sized for `extra` sequences more, enough for
    prompts_per_step such chunks beside num_seqs decoding sequences."""
    from herd.model.config import Llama4TextConfig
    c = Llama4TextConfig.from_pretrained(path)
    per_token_layer = 2 * c.num_key_value_heads * c.head_dim * dtype_bytes
    blocks_full = -(-max_len // block_size)
    local_layers = [i for i in range(c.num_hidden_layers)
                    if c.attention_chunk_size and c.is_rope_layer(i) and c.architecture != "LlamaForCausalLM"]
    blocks_local = min(blocks_full, -(-(c.attention_chunk_size or 1) // block_size) + 1)
    seq_bytes = sum((blocks_local if i in local_layers else blocks_full) * block_size * per_token_layer
                    for i in range(c.num_hidden_layers))
    extra = 1
    if local_layers:
        prompt_blocks = -(-context // block_size)            # local blocks one whole-prompt chunk holds
        extra += prompts_per_step * -(-prompt_blocks // blocks_local)
    return (num_seqs * 1.02 + extra) * seq_bytes / 2**30 + 0.02


def summarize(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {"n": len(v), "mean_ms": 1e3 * statistics.fmean(v), "median_ms": 1e3 * v[len(v) // 2],
            "p90_ms": 1e3 * v[min(len(v) - 1, int(0.9 * len(v)))], "max_ms": 1e3 * v[-1]}


def measure(llm, probe: Probe, n_steps: int, noop: bool, step_s: list[float]):
    """Run n_steps engine steps, recording timers."""
    engine = llm.llm_engine
    probe.noop = noop
    probe.reset()
    probe.recording = True
    for _ in range(n_steps):
        t = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - t)
    probe.recording = False
    times = {k: list(v) for k, v in probe.times.items()}
    return times, list(probe.msg_bytes), list(probe.msg_pickle_s)


def per_step(times: dict[str, list[float]], n: int) -> dict[str, list[float]]:
    """Several calls of one label in a step (update + prepare) add up; calls are in step order."""
    out = {}
    for k, v in times.items():
        if len(v) % n == 0 and len(v) >= n:
            m = len(v) // n
            out[k] = [sum(v[i * m:(i + 1) * m]) for i in range(n)]
        else:
            out[k] = v
    return out


def breakdown(step_s: list[float], times: dict, pickle_s: list[float]) -> list[tuple[str, dict]]:
    n = len(step_s)
    t = per_step(times, n)
    host = [s - p - f for s, p, f in zip(step_s, pickle_s or [0.0] * n, t.get("forward", [0.0] * n))]
    rows = [("step wall time (engine.step)", summarize(step_s)),
            ("step, host only (no TP pickle, no forward)", summarize(host)),
            ("  schedule (scheduler + diffs)", summarize(t.get("schedule", []))),
            ("  execute (runner, incl. forward)", summarize(t.get("execute", []))),
            ("    prepare_inputs (batch update + step arrays)", summarize(t.get("prepare_inputs", []))),
            ("    metadata (tensors + attention plan)", summarize(t.get("metadata", []))),
            ("    forward", summarize(t.get("forward", []))),
            ("    logits", summarize(t.get("logits", []))),
            ("    sample", summarize(t.get("sample", []))),
            ("  TP message pickle (mp executor, driver side)", summarize(pickle_s))]
    if t.get("execute") and t.get("schedule"):
        post = [s - p - e - sc for s, p, e, sc in zip(step_s, pickle_s or [0.0] * n, t["execute"], t["schedule"])]
        rows.insert(len(rows) - 1, ("  engine after execute (outputs, stop checks)", summarize(post)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = ap.add_argument_group("benchmark")
    g.add_argument("--model", dest="bench_model", default=None, help="checkpoint folder (default: herd's embedded model)")
    g.add_argument("--num-seqs", type=int, default=256)
    g.add_argument("--context", type=int, default=8192, help="prompt tokens per sequence")
    g.add_argument("--steps", type=int, default=32, help="measured decode steps")
    g.add_argument("--warmup-steps", type=int, default=4)
    g.add_argument("--real-forward-steps", type=int, default=2)
    g.add_argument("--prefill-prompts-per-step", type=int, default=2,
                   help="prompts per prefill step (max_num_batched_tokens = this x --context unless given; "
                        "the KV pool gets room for as many whole-prompt chunks)")
    g.add_argument("--threads", type=int, default=C.DEFAULT_THREADS)
    g.add_argument("--quick", action="store_true", help="tiny run: 8 sequences at 512 tokens, 4 steps")
    g.add_argument("--output-json", default=None)
    g.add_argument("--generate-prompts", type=int, default=0,
                   help="also time one LLM.generate over this many random prompts (0: skip)")
    g.add_argument("--generate-prompt-len", type=int, default=128)
    g.add_argument("--generate-max-tokens", type=int, default=64)
    g.add_argument("--generate-rounds", type=int, default=5)
    C.add_herd_args(ap.add_argument_group("herd engine"))
    args = ap.parse_args(argv)
    if args.quick:
        args.num_seqs, args.context, args.steps, args.warmup_steps, args.real_forward_steps = 8, 512, 4, 2, 1
    C.apply_threads(args.threads)
    from herd.hub.default import default_model_path

    path = args.bench_model or default_model_path()
    kw = C.herd_kwargs(args, drop=("max_num_seqs", "max_model_len"))
    if not C.user_set(args, "dtype") or args.dtype == "auto":
        kw.pop("dtype", None)
    # Sequences admitted first decode while later ones prefill: a large step budget (only the
    # no-op forward sees it) keeps the prefill phase short, so contexts stay close to --context,
    # and max_tokens leaves room for those early tokens so that no sequence finishes before the end.
    budget = kw.setdefault("max_num_batched_tokens", max(2048, args.prefill_prompts_per_step * args.context))
    prefill_steps = -(-args.num_seqs * args.context // budget)
    n_out = prefill_steps + args.warmup_steps + args.steps + args.real_forward_steps + 16
    max_len = args.context + n_out + 8
    kw.update(max_model_len=max_len, max_num_seqs=args.num_seqs)
    from herd.config import resolve_dtype
    from herd.model.config import Llama4TextConfig
    cfg = Llama4TextConfig.from_pretrained(path)
    dtype_bytes = resolve_dtype(kw.get("dtype", "auto"), cfg.torch_dtype).itemsize
    if not C.user_set(args, "num_kv_blocks") and not C.user_set(args, "cpu_kv_cache_space"):
        per_step = max(1, budget // args.context)
        kw["cpu_kv_cache_space_gib"] = round(kv_space_gib(path, dtype_bytes, args.num_seqs, max_len,
                                                          args.block_size or 128, args.context, per_step), 3)
    C.status(f"model {path}; LLM kwargs {kw}")
    llm = C.make_llm(path, **kw)
    probe = attach_probe(llm)
    for m in probe.missing:
        C.status(f"warning: engine internal {m} not found; its timer is skipped")
    for n in probe.notes:
        C.status(f"warning: {n}")

    from herd.engine.sampling_params import SamplingParams
    engine = llm.llm_engine
    pool = C.prompt_token_pool(path)
    prompts = C.random_prompts(pool, [args.context] * args.num_seqs, 0)
    for i, p in enumerate(prompts):
        engine.add_request(f"host-{i}", {"prompt_token_ids": p},
                           SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True))
    C.status(f"prefilling {args.num_seqs} x {args.context} tokens with the no-op forward")
    probe.noop = True
    have_first, steps, t0 = set(), 0, time.perf_counter()
    prefill_msgs = []
    probe.recording = True   # only the message sizes are kept from these steps
    while len(have_first) < args.num_seqs:
        for o in engine.step():
            if o.outputs[0].token_ids:
                have_first.add(o.request_id)
        steps += 1
        prefill_msgs += probe.msg_bytes
        probe.reset()
        if steps % 100 == 0:
            C.status(f"  prefill step {steps}: {len(have_first)}/{args.num_seqs} sequences have their first token")
    probe.recording = False
    C.status(f"prefill done: {steps} steps in {time.perf_counter() - t0:.1f} s (host only)")
    st = engine.stats()
    if st.num_running != args.num_seqs or st.num_preemptions:
        C.status(f"warning: {st.num_running} running (want {args.num_seqs}), {st.num_preemptions} preemptions")
    junk: list[float] = []
    measure(llm, probe, args.warmup_steps, True, junk)
    step_s: list[float] = []
    C.status(f"measuring {args.steps} decode steps (no-op forward), batch {args.num_seqs}, context ~{args.context}")
    times, msg_bytes, pickle_s = measure(llm, probe, args.steps, True, step_s)
    real = None
    if args.real_forward_steps:
        C.status(f"{args.real_forward_steps} decode steps with the real forward")
        real_steps: list[float] = []
        r_times, _, r_pickle = measure(llm, probe, args.real_forward_steps, False, real_steps)
        real = {"step_s": real_steps, "rows": breakdown(real_steps, r_times, r_pickle)}
    st = engine.stats()
    if st.num_running != args.num_seqs:
        C.status(f"warning: only {st.num_running} of {args.num_seqs} sequences were still running at the end")
    for i in range(args.num_seqs):
        engine.abort_request(f"host-{i}")
    C.free_llm(llm)
    gen = generate_throughput(path, args, kw, pool) if args.generate_prompts else None

    rows = breakdown(step_s, times, pickle_s)
    print()
    print(f"herd host time per decode step: {args.num_seqs} sequences at ~{args.context} tokens of context, "
          f"{args.steps} steps, model forward replaced by a no-op, {args.threads} threads")
    print()
    print(C.markdown_table(["part", "mean ms", "median ms", "p90 ms", "µs per sequence (mean)"],
                           [[name, C.fmt(s.get("mean_ms"), 3), C.fmt(s.get("median_ms"), 3), C.fmt(s.get("p90_ms"), 3),
                             C.fmt(s["mean_ms"] * 1e3 / args.num_seqs, 2) if s.get("n") else "-"] for name, s in rows]))
    if msg_bytes:
        print(f"\nTP worker message per decode step (pickle of ('execute_model', (SchedulerOutput,), False)): "
              f"mean {statistics.fmean(msg_bytes):,.0f} bytes, max {max(msg_bytes):,} bytes "
              f"({statistics.fmean(msg_bytes) / args.num_seqs:.1f} bytes per sequence); "
              f"prefill phase: {len(prefill_msgs)} messages, max {max(prefill_msgs or [0]):,} bytes, "
              f"total {sum(prefill_msgs):,} bytes")
    if gen:
        print(f"\nLLM.generate: {gen['prompts']} prompts x {gen['prompt_len']} tokens -> {gen['max_tokens']} tokens "
              f"each (real forward), output tokens/s, median of {len(gen['sync_tok_s'])} interleaved rounds: "
              f"synchronous {gen['sync_median']:.0f} {[round(x) for x in gen['sync_tok_s']]}, "
              f"async scheduling {gen['async_median']:.0f} {[round(x) for x in gen['async_tok_s']]}")
    if real:
        wall, host = real["rows"][0][1], real["rows"][1][1]
        fwd = dict(real["rows"]).get("    forward", {})
        print(f"with the real forward ({args.real_forward_steps} steps): step wall time mean "
              f"{C.fmt(wall.get('mean_ms'), 1)} ms, forward mean {C.fmt(fwd.get('mean_ms'), 1)} ms, "
              f"host {C.fmt(host.get('mean_ms'), 3)} ms per step")
    C.write_json(args.output_json, {
        "args": vars(args), "machine": C.machine_info(), "llm_kwargs": kw, "missing_internals": probe.missing,
        "notes": probe.notes, "noop": {name: s for name, s in rows}, "step_s": step_s,
        "tp_message_bytes": msg_bytes, "tp_pickle_s": pickle_s, "prefill_message_bytes": prefill_msgs,
        "real_forward": {name: s for name, s in real["rows"]} if real else None, "generate": gen,
        "final_stats": {"num_running": st.num_running, "num_preemptions": st.num_preemptions,
                        "kv_cache_usage": st.kv_cache_usage}})
    return 0


def generate_throughput(path: str, args, kw: dict, pool: list[int]) -> dict:
    """LLM.generate of --generate-prompts random prompts on two fresh engines, synchronous and async
    scheduling (the same herd flags otherwise, a KV cache sized by default), in --generate-rounds
    interleaved rounds so that both see the same machine load; greedy with EOS ignored, so every
    prompt makes --generate-max-tokens tokens. A first, untimed call warms each engine up."""
    from herd.engine.sampling_params import SamplingParams
    n, plen, out = args.generate_prompts, args.generate_prompt_len, args.generate_max_tokens
    gkw = {k: v for k, v in kw.items() if k not in ("cpu_kv_cache_space_gib", "max_num_batched_tokens")}
    gkw.update(max_model_len=plen + out + 8, max_num_seqs=min(n, 256))
    C.status(f"LLM.generate of {n} prompts x {plen} tokens -> {out} tokens, {args.generate_rounds} rounds; "
             f"LLM kwargs {gkw}")
    llms = {mode: C.make_llm(path, **{**gkw, "async_scheduling": mode}) for mode in (False, True)}
    prompts = [{"prompt_token_ids": p} for p in C.random_prompts(pool, [plen] * n, 1)]
    params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
    for llm in llms.values():
        llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    tok_s: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.generate_rounds):
        for mode in ((False, True) if r % 2 == 0 else (True, False)):
            t = time.perf_counter()
            outs = llms[mode].generate(prompts, params, use_tqdm=False)
            tok_s[mode].append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
    for llm in llms.values():
        C.free_llm(llm)
    return {"prompts": n, "prompt_len": plen, "max_tokens": out, "sync_tok_s": tok_s[False],
            "async_tok_s": tok_s[True], "sync_median": statistics.median(tok_s[False]),
            "async_median": statistics.median(tok_s[True])}


if __name__ == "__main__":
    sys.exit(main())
