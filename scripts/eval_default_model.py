#!/usr/bin/env python3
"""Held-out perplexity of the default model (or any Llama 4 folder with the same tokenizer), with transformers.

The held-out text is the KJV books listed in scripts/prepare_default_data.py (HELDOUT_BOOKS), which the
tokenizer and the model never saw. Each chapter is scored as <|begin_of_text|> prose <|end_of_text|>
with a sliding window (--context tokens, advancing by --stride < --context; every token is scored
once, with at least context - stride tokens of history once the window slides).

    python scripts/eval_default_model.py                 # perplexity of herd/assets/default
    python scripts/eval_default_model.py --samples       # also greedy and sampled generations
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_default_data import prepare, read_jsonl  # noqa: E402

PROMPTS = [
    "In the beginning God created",
    "And the LORD said unto Moses,",
    "Blessed are the",
    "And it came to pass, when the king",
]
CHATS = ["Tell me about David.", "Give me a verse about love.", "Who made the heaven and the earth?"]


def score_document(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """Sum of -log p over ids[1:] and the number of scored tokens (each token scored exactly once)."""
    if not 0 < stride < context:
        raise ValueError(f"need 0 < stride < context, got stride {stride}, context {context}")
    nll, done = 0.0, 1  # ids[done:] are still to be scored
    while done < len(ids):
        end = min(len(ids), context if done == 1 else done + stride)
        start = max(0, end - context)
        window = torch.tensor(ids[start:end])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=window).logits[0, :-1].float(), -1)
        first = done - (start + 1)  # logp row r predicts ids[start + 1 + r]
        nll -= logp[first:].gather(1, window[0, done - start:, None]).sum().item()
        done = end
    return nll, len(ids) - 1


def perplexity(model, tokenizer, docs: list[dict], context: int, stride: int) -> dict:
    eot = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    nll, tokens, nbytes = 0.0, 0, 0
    for d in tqdm(docs, desc="held-out chapters"):
        ids = tokenizer(d["text"])["input_ids"] + [eot]
        n, k = score_document(model, ids, context, stride)
        nll, tokens, nbytes = nll + n, tokens + k, nbytes + len(d["text"].encode()) + 1
    return {"chapters": len(docs), "tokens": tokens, "bytes": nbytes, "nll_per_token": nll / tokens,
            "perplexity": math.exp(nll / tokens), "bits_per_byte": nll / math.log(2) / nbytes}


def generations(model, tokenizer, seed: int) -> list[dict]:
    out = []
    for mode in ("greedy", "sampled"):
        torch.manual_seed(seed)
        kw = {"do_sample": False} if mode == "greedy" else {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
        for p in PROMPTS:
            ids = tokenizer(p, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, max_new_tokens=40, **kw)
            out.append({"mode": mode, "prompt": p, "text": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
        for q in CHATS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            gen = model.generate(ids, max_new_tokens=48, **kw)
            out.append({"mode": mode + " chat", "prompt": q,
                        "text": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="herd/assets/default")
    ap.add_argument("--data", default="build/default_model/data", help="made by prepare_default_data.py if missing")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--samples", action="store_true", help="also print greedy and sampled generations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not 0 < args.stride < args.context:
        raise SystemExit("--stride must be at least 1 and less than --context")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    if not os.path.exists(os.path.join(args.data, "heldout.jsonl")):
        prepare(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), local_files_only=True)
    model.eval()
    result = perplexity(model, tokenizer, read_jsonl(os.path.join(args.data, "heldout.jsonl")), args.context, args.stride)
    result.update(model=args.model, context=args.context, stride=args.stride, dtype=args.dtype)
    print(json.dumps(result, indent=2))
    if args.samples:
        for g in generations(model, tokenizer, args.seed):
            print(f"[{g['mode']}] {g['prompt']!r} -> {g['text']!r}")


if __name__ == "__main__":
    main()
