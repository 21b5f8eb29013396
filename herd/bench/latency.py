"""`herd bench latency [MODEL]`: time one batch from prompt to last token, as `vllm bench latency`."""
from __future__ import annotations

import json
import random
import sys
import time

import numpy as np
from tqdm import tqdm

from herd.engine.arg_utils import add_engine_args, add_model_arg, engine_kwargs, resolve_model

PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_arguments(parser):
    add_model_arg(parser)
    parser.add_argument("--input-len", "--input_len", dest="input_len", type=int, default=32)
    parser.add_argument("--output-len", "--output_len", dest="output_len", type=int, default=128)
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    parser.add_argument("--num-iters-warmup", "--num_iters_warmup", dest="num_iters_warmup", type=int, default=10)
    parser.add_argument("--num-iters", "--num_iters", dest="num_iters", type=int, default=30)
    parser.add_argument("--output-json", "--output_json", dest="output_json", default=None)
    add_engine_args(parser)


def measure_latency(llm, batch_size: int, input_len: int, output_len: int, num_iters_warmup: int,
                    num_iters: int, seed: int = 0) -> dict:
    """Seconds per `generate` of `batch_size` random prompts, each producing exactly output_len tokens."""
    from herd.engine.sampling_params import SamplingParams

    if min(batch_size, input_len, output_len, num_iters) < 1:
        raise ValueError("--batch-size, --input-len, --output-len and --num-iters must be at least 1")
    rng = random.Random(seed)
    vocab = llm.config.model.hf_config.vocab_size
    special = set(getattr(llm.get_tokenizer(), "all_special_ids", []) or [])
    allowed = [t for t in range(vocab) if t not in special]
    prompts = [{"prompt_token_ids": [rng.choice(allowed) for _ in range(input_len)]} for _ in range(batch_size)]
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len)

    def once() -> float:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    for _ in tqdm(range(num_iters_warmup), desc="Warmup iterations", leave=False):
        once()
    latencies = [once() for _ in tqdm(range(num_iters), desc="Profiling iterations", leave=False)]
    arr = np.asarray(latencies)
    return {"avg_latency": float(arr.mean()), "latencies": latencies,
            "percentiles": {str(p): float(np.percentile(arr, p)) for p in PERCENTILES},
            "batch_size": batch_size, "input_len": input_len, "output_len": output_len}


def format_latency(result: dict) -> str:
    lines = [f"Avg latency: {result['avg_latency']} seconds"]
    lines += [f"{p}% percentile latency: {v} seconds" for p, v in result["percentiles"].items()]
    return "\n".join(lines)


def run(args) -> int:
    from herd.engine.llm import LLM
    from herd.hub.default import default_model_path

    try:
        llm = LLM(resolve_model(args) or default_model_path(), **engine_kwargs(args))
        result = measure_latency(llm, args.batch_size, args.input_len, args.output_len, args.num_iters_warmup,
                                 args.num_iters, args.seed or 0)
    except (ValueError, OSError, TypeError) as e:
        print(f"herd bench latency: error: {e}", file=sys.stderr)
        return 2
    print(format_latency(result))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
