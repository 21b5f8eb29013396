"""The throughput cost of structured outputs: output tokens/s at one batch size with and without a
JSON schema, in one run, and their ratio.

Each repeat first runs the constrained requests once to learn their lengths; then it times them
again (seeded: the same replies) and an unconstrained run that generates exactly as many tokens per
request (max_tokens = that request's constrained length, EOS ignored), alternating which goes first.
Both runs have the same batch shape over time, so only the grammar work differs. Sampling is random
(temperature 0.8), as JSON requests usually are. Each side is warmed up and its best of --repeats is
kept (shared machines are noisy), in wall time (tokens/s) and in process CPU time per token, which
counts the grammar engine's threads too. The run also reports how long the bitmasks took to fill (in
the worker thread, overlapping the forward) and how long the sampler actually waited for them: the
part of the grammar work left on the critical path.

    OMP_NUM_THREADS=1 python benchmarks/structured_outputs.py [--model DIR] [--batch-size 16] \
        [--max-tokens 384] [--repeats 5] [--device cpu|cuda] [--output-json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads

import jsonschema  # noqa: E402
import torch  # noqa: E402

from herd.engine.llm import LLM  # noqa: E402
from herd.engine.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402
from herd.hub.default import default_model_path  # noqa: E402
from herd.structured_output.manager import StructuredOutputRequest  # noqa: E402

# An order as an API might ask for it: nested objects, an array, a pattern, enums, bounded numbers.
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "customer": {"type": "string", "maxLength": 24},
        "status": {"type": "string", "enum": ["new", "paid", "shipped", "cancelled"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                           "price_cents": {"type": "integer", "minimum": 0, "maximum": 1000000}},
            "required": ["sku", "quantity", "price_cents"]}},
        "express": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 20},
    },
    "required": ["order_id", "customer", "status", "items", "express", "note"],
}
PROMPTS = ["Write the order as JSON.", "And the king commanded", "The merchant wrote down", "Give me a record",
           "In the house of the LORD", "A list of things bought", "Then said he unto them", "Order:"]


class GrammarTimers:
    """Wall time spent filling bitmasks (worker thread) and waiting for them (sampler)."""

    def __init__(self, llm: LLM):
        self.fill = self.wait = 0.0
        self.steps = 0
        backend = llm.llm_engine.structured_output.backend
        fill, take = backend.fill_bitmask, StructuredOutputRequest.take_bitmask

        def timed_fill(grammars, bitmask):
            t = time.perf_counter()
            fill(grammars, bitmask)
            self.fill += time.perf_counter() - t
            self.steps += 1

        def timed_take(req):
            t = time.perf_counter()
            out = take(req)
            self.wait += time.perf_counter() - t
            return out

        backend.fill_bitmask = timed_fill
        StructuredOutputRequest.take_bitmask = timed_take


def run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    bs = args.batch_size
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_tokens + 64, max_num_seqs=bs,
              enable_prefix_caching=False, device=args.device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(bs)]
    so = StructuredOutputsParams(json=ORDER_SCHEMA)
    t0 = time.perf_counter()
    llm.llm_engine.structured_output.compile(SamplingParams(structured_outputs=so))
    compile_s = time.perf_counter() - t0

    def constrained(seed):
        return [SamplingParams(temperature=0.8, seed=seed + i, max_tokens=args.max_tokens, structured_outputs=so)
                for i in range(bs)]

    run(llm, prompts, constrained(1000))  # warm-up: both paths, compiled grammar cached
    best = {"json_schema": None, "unconstrained": None}
    valid = total = 0
    timers = None
    for r in range(args.repeats):
        _, outs = run(llm, prompts, constrained(r * bs))  # the lengths (seeded: the timed run repeats it)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        for o in outs:
            total += 1
            try:
                jsonschema.validate(json.loads(o.outputs[0].text), ORDER_SCHEMA)
                valid += o.outputs[0].finish_reason == "stop"
            except (json.JSONDecodeError, jsonschema.ValidationError):
                pass
        same = [SamplingParams(temperature=0.8, seed=r * bs + i, max_tokens=n, ignore_eos=True)
                for i, n in enumerate(lengths)]
        if r == 0:
            run(llm, prompts, same)  # warm-up of the unconstrained shapes
            timers = GrammarTimers(llm)
        sides = [("json_schema", constrained(r * bs)), ("unconstrained", same)]
        for name, params in (sides if r % 2 == 0 else sides[::-1]):  # alternate which goes first
            cpu0 = time.process_time()
            dt, outs = run(llm, prompts, params)
            cpu = time.process_time() - cpu0
            assert [len(o.outputs[0].token_ids) for o in outs] == lengths
            tps = sum(lengths) / dt
            b = best[name]
            if b is None or tps > b["output_tokens_per_s"]:
                b = best[name] = {**(b or {}), "seconds": dt, "output_tokens": sum(lengths), "output_tokens_per_s": tps}
            b["cpu_ms_per_token"] = min(b.get("cpu_ms_per_token", float("inf")), 1000 * cpu / sum(lengths))
    ratio = best["json_schema"]["output_tokens_per_s"] / best["unconstrained"]["output_tokens_per_s"]
    cpu_ratio = best["json_schema"]["cpu_ms_per_token"] / best["unconstrained"]["cpu_ms_per_token"]
    steps = max(timers.steps, 1)
    grammar = {"mask_fill_ms_per_step": 1000 * timers.fill / steps,
               "sampler_wait_ms_per_step": 1000 * timers.wait / steps, "constrained_steps": timers.steps}
    result = {"model": args.model, "device": args.device, "dtype": args.dtype, "batch_size": bs,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "grammar_compile_s": compile_s, "valid_replies": f"{valid}/{total}", **best, **grammar,
              "ratio_json_over_unconstrained": ratio, "cpu_time_ratio_json_over_unconstrained": cpu_ratio}
    print(f"batch {bs}, {args.device}, {args.dtype}, {torch.get_num_threads()} thread(s); schema compiled in "
          f"{compile_s * 1000:.1f} ms; valid replies {valid}/{total}")
    for name in best:
        b = best[name]
        print(f"  {name:>13}: {b['output_tokens']} tokens in {b['seconds']:.2f} s = "
              f"{b['output_tokens_per_s']:.1f} output tokens/s; {b['cpu_ms_per_token']:.2f} CPU ms per token")
    print(f"  ratio json_schema / unconstrained: {ratio:.3f} tokens/s, {cpu_ratio:.3f} CPU time per token")
    print(f"  bitmasks: {grammar['mask_fill_ms_per_step']:.2f} ms per step to fill in the worker thread, "
          f"{grammar['sampler_wait_ms_per_step']:.2f} ms per step waited for by the sampler "
          f"({timers.steps} constrained steps)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
