"""`herd bench throughput [MODEL]`: offline generation throughput, herd's LLM or transformers' generate.

Prints `vllm bench throughput`'s line: "Throughput: X requests/s, Y total tokens/s, Z output tokens/s".
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

from herd.bench.datasets import (HFTokenizer, SampleRequest, add_dataset_args, load_requests,
                                 random_token_requests)
from herd.engine.arg_utils import add_engine_args, add_model_arg, engine_kwargs, resolve_model


@dataclass
class ThroughputResult:
    backend: str
    elapsed_time: float
    num_requests: int
    total_prompt_tokens: int
    total_output_tokens: int

    @property
    def total_num_tokens(self) -> int:
        return self.total_prompt_tokens + self.total_output_tokens

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(total_num_tokens=self.total_num_tokens,
                 requests_per_second=self.num_requests / self.elapsed_time,
                 tokens_per_second=self.total_num_tokens / self.elapsed_time,
                 output_tokens_per_second=self.total_output_tokens / self.elapsed_time)
        return d

    def summary(self) -> str:
        j = self.to_json()
        return (f"Throughput: {j['requests_per_second']:.2f} requests/s, {j['tokens_per_second']:.2f} total tokens/s, "
                f"{j['output_tokens_per_second']:.2f} output tokens/s\n"
                f"Total num prompt tokens:  {self.total_prompt_tokens}\n"
                f"Total num output tokens:  {self.total_output_tokens}")


def _prompt(r: SampleRequest):
    return {"prompt_token_ids": r.prompt} if isinstance(r.prompt, list) else r.prompt


def run_herd(llm, requests: list[SampleRequest], temperature: float = 1.0, warmup: bool = True,
             use_tqdm: bool = True) -> ThroughputResult:
    """Every request at once through `llm.generate`, each generating exactly its output length."""
    from herd.engine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=temperature, top_p=1.0, ignore_eos=True, max_tokens=r.expected_output_len)
              for r in requests]
    if warmup:  # first-call costs (allocations, lazy inits) are not throughput
        llm.generate([_prompt(requests[0])], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([_prompt(r) for r in requests], params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    return ThroughputResult("herd", elapsed, len(outs), sum(len(o.prompt_token_ids) for o in outs),
                            sum(len(c.token_ids) for o in outs for c in o.outputs))


def run_hf(model, tokenizer, requests: list[SampleRequest], max_batch_size: int, temperature: float = 1.0,
           warmup: bool = True) -> ThroughputResult:
    """transformers `generate` in batches of up to `max_batch_size` (left-padded), each request
    generating exactly its output length (min_new_tokens = max_new_tokens)."""
    import torch
    from tqdm import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def ids_of(r):
        return r.prompt if isinstance(r.prompt, list) else tokenizer.encode(r.prompt)

    def generate(batch: list[SampleRequest]) -> int:
        seqs = [ids_of(r) for r in batch]
        width = max(map(len, seqs))
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        n = max(r.expected_output_len for r in batch)
        sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
            dict(do_sample=False)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=pad, **sample)
        return (out.shape[1] - width) * len(batch)

    if warmup:
        generate([SampleRequest(requests[0].prompt, requests[0].prompt_len, 2)])
    start = time.perf_counter()
    total_out = 0
    for i in tqdm(range(0, len(requests), max_batch_size), desc="hf batches", leave=False):
        total_out += generate(requests[i:i + max_batch_size])
    elapsed = time.perf_counter() - start
    return ThroughputResult("hf", elapsed, len(requests), sum(len(ids_of(r)) for r in requests), total_out)


def load_hf_model(path: str, dtype: str = "auto", device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from herd.config import resolve_dtype
    from herd.model.config import Llama4TextConfig

    torch_dtype = resolve_dtype(dtype, Llama4TextConfig.from_pretrained(path).torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def add_arguments(parser):
    add_model_arg(parser)
    parser.add_argument("--backend", default="herd", choices=["herd", "hf"],
                        help="herd's engine, or transformers generate for comparison")
    parser.add_argument("--hf-max-batch-size", "--hf_max_batch_size", dest="hf_max_batch_size", type=int,
                        default=16, help="batch size of the hf backend")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--output-json", "--output_json", dest="output_json", default=None,
                        help="write the result as JSON here")
    add_dataset_args(parser, input_len=128, output_len=128, num_prompts=100, with_seed=False)
    add_engine_args(parser)


def build_requests(args, model_path: str, tokenizer=None) -> list[SampleRequest]:
    """Random prompts are token ids (any token but the special ones); file datasets are text."""
    seed = args.seed if args.seed is not None else 0
    if args.dataset_name == "random":
        from herd.engine.tokenizer import get_tokenizer
        from herd.model.config import Llama4TextConfig
        vocab = Llama4TextConfig.from_pretrained(model_path).vocab_size
        tok = tokenizer or get_tokenizer(model_path)
        special = set(getattr(tok, "all_special_ids", []) or [])
        # ids the tokenizer does not know (vocab padding) are skipped too
        known = len(tok)
        skip = special | set(range(min(known, vocab), vocab))
        return random_token_requests(args.num_prompts, args.input_len, args.output_len, vocab,
                                     args.random_range_ratio, seed, skip)
    args.seed = seed
    return load_requests(args, HFTokenizer(model_path))


def run(args) -> int:
    from herd.hub.default import default_model_path

    model_path = resolve_model(args) or default_model_path()
    try:
        requests = build_requests(args, model_path)
        if args.backend == "herd":
            from herd.engine.llm import LLM
            llm = LLM(model_path, **engine_kwargs(args))
            result = run_herd(llm, requests, args.temperature)
        else:
            model, tok = load_hf_model(model_path, args.dtype, args.device or "cpu")
            result = run_hf(model, tok, requests, args.hf_max_batch_size, args.temperature)
    except (ValueError, OSError, TypeError) as e:
        print(f"herd bench throughput: error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, indent=2)
    return 0
