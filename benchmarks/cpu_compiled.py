"""Compiled decode on the CPU (`-O 3`) against eager mode: speed, compile time, greedy parity.

For each model and batch size B: B random-token prompts of --input-len tokens generate exactly
--output-len tokens (greedy, EOS ignored) in an eager engine (`enforce_eager=True`) and in a
compiled one (`compilation_config={"level": 3, "cudagraph_capture_sizes": [B]}`, inductor with
herd's CPU defaults: frozen weights, GEMMs autotuned between inductor's template and MKL). The
compiled engine's first generate (a warm-up on other prompts of the same shape) pays the compile;
then both engines generate the same prompts and their token ids are compared. Reported per row:
output tok/s of both, the ratio, the warm-up's seconds and whether every sequence matched.

    python benchmarks/cpu_compiled.py [--models smollm2-fp32 smollm2-bf16 moe-fp32]
        [--batch-sizes 1 16 64] [--input-len 64] [--output-len 128] [--threads 2]
        [--output-json results/cpu_compiled.json]

Exits 1 when a compiled engine's greedy output differs from eager's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cpu_common as C  # noqa: E402

C.preset_threads()


def generate(llm, prompts, n):
    from herd import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return time.perf_counter() - t, [list(o.outputs[0].token_ids) for o in outs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-fp32", "smollm2-bf16", "moe-fp32"],
                    choices=list(C.MODELS))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=C.DEFAULT_THREADS)
    ap.add_argument("--moe-model", default=None)
    ap.add_argument("--output-json", default=None)
    a = ap.parse_args(argv)
    C.apply_threads(a.threads)
    rows, table, ok = [], [], True
    max_len = a.input_len + a.output_len + 8
    for name in a.models:
        model, dtype = C.MODELS[name]
        path = C.moe_folder(a.moe_model) if model == "moe" else C.smollm2_folder()
        pool = C.prompt_token_pool(path)
        for bs in a.batch_sizes:
            warm = C.random_prompts(pool, [a.input_len] * bs, 1000 + bs)
            prompts = C.random_prompts(pool, [a.input_len] * bs, bs)
            common = dict(dtype=dtype, max_num_seqs=bs, max_model_len=max_len)
            C.status(f"{name} batch {bs}: eager")
            llm = C.make_llm(path, enforce_eager=True, **common)
            generate(llm, warm, 4)
            eager_s, eager_ids = generate(llm, prompts, a.output_len)
            C.free_llm(llm)
            C.status(f"{name} batch {bs}: compiled (-O 3), warm-up compiles")
            llm = C.make_llm(path, compilation_config={"level": 3, "cudagraph_capture_sizes": [bs]}, **common)
            warm_s, _ = generate(llm, warm, a.output_len)
            comp_s, comp_ids = generate(llm, prompts, a.output_len)
            C.free_llm(llm)
            same = sum(x == y for x, y in zip(eager_ids, comp_ids))
            ok &= same == bs
            tok = bs * a.output_len
            row = dict(model=name, batch=bs, eager_tok_s=tok / eager_s, compiled_tok_s=tok / comp_s,
                       ratio=eager_s / comp_s, warmup_s=warm_s, same_sequences=same)
            rows.append(row)
            table.append([name, bs, C.fmt(row["eager_tok_s"]), C.fmt(row["compiled_tok_s"]), C.xfmt(row["ratio"]),
                          C.fmt(warm_s), f"{same}/{bs}"])
            C.status(f"{name} batch {bs}: eager {row['eager_tok_s']:.1f} tok/s, compiled "
                     f"{row['compiled_tok_s']:.1f} tok/s, warm-up {warm_s:.0f} s, {same}/{bs} identical")
    print(C.markdown_table(["model", "batch", "eager tok/s", "-O 3 tok/s", "-O 3 / eager",
                            "warm-up (compile) s", "greedy = eager"], table))
    C.write_json(a.output_json, {"machine": C.machine_info(), "args": vars(a), "rows": rows})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
