"""herd vs transformers `generate` on CPU: output tokens/s at several batch sizes, in one run.

Both sides get the same random prompts (token ids), generate exactly --output-len tokens each
(EOS ignored), greedy, same dtype, one thread each; herd runs with max_num_seqs = batch size so
that both process `batch` sequences at a time. Each side is warmed up first, then measured
--repeats times, alternating, and its best run is kept.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/cpu_generate.py [--model DIR] \
        [--batch-sizes 1 16] [--input-len 64] [--output-len 64] [--rounds 2] [--repeats 2] [--output-json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

# one thread for both engines: a fair comparison on shared cores (set before torch loads)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

from herd.bench.datasets import random_token_requests  # noqa: E402
from herd.bench.perplexity import free_engine  # noqa: E402
from herd.bench.throughput import load_hf_model, run_herd, run_hf  # noqa: E402
from herd.engine.llm import LLM  # noqa: E402
from herd.hub.default import default_model_path  # noqa: E402
from herd.model.config import Llama4TextConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="batches per measurement")
    ap.add_argument("--repeats", type=int, default=2,
                    help="measurements per side, alternating herd and transformers; the best of each is kept "
                         "(shared machines are noisy)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (both engines)")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    cfg = Llama4TextConfig.from_pretrained(args.model)
    hf_model, hf_tok = load_hf_model(args.model, args.dtype)
    skip = set(hf_tok.all_special_ids) | set(range(len(hf_tok), cfg.vocab_size))
    rows = []
    for bs in args.batch_sizes:
        reqs = random_token_requests(bs * args.rounds, args.input_len, args.output_len, cfg.vocab_size,
                                     seed=bs, skip_ids=skip)
        llm = LLM(args.model, dtype=args.dtype, max_model_len=args.input_len + args.output_len + 8,
                  max_num_seqs=bs, enable_prefix_caching=False, device="cpu")
        best: dict[str, dict] = {}
        for i in range(args.repeats):
            for name, res in (("herd", lambda: run_herd(llm, reqs, temperature=0.0, warmup=i == 0, use_tqdm=False)),
                              ("hf", lambda: run_hf(hf_model, hf_tok, reqs, bs, temperature=0.0, warmup=i == 0))):
                j = res().to_json()
                if name not in best or j["output_tokens_per_second"] > best[name]["output_tokens_per_second"]:
                    best[name] = j
        free_engine(llm)
        h, t = best["herd"], best["hf"]
        rows.append({"batch_size": bs, "herd_output_tok_s": h["output_tokens_per_second"],
                     "hf_output_tok_s": t["output_tokens_per_second"],
                     "ratio": h["output_tokens_per_second"] / t["output_tokens_per_second"],
                     "herd": h, "hf": t})
        print(f"batch {bs:>3}: herd {h['output_tokens_per_second']:8.1f} tok/s   transformers "
              f"{t['output_tokens_per_second']:8.1f} tok/s   ratio {rows[-1]['ratio']:.2f}x", flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    print(json.dumps(machine))
    print("\n| batch | herd (output tok/s) | transformers generate (output tok/s) | herd / transformers |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['herd_output_tok_s']:.1f} | {r['hf_output_tok_s']:.1f} | {r['ratio']:.2f}x |")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "machine": machine, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
