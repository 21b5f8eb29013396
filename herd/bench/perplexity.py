"""Perplexity with herd's engine: prompt logprobs of a text cut into windows, and FP8 recovery.

Each window is scored as one prompt (`SamplingParams(max_tokens=1, prompt_logprobs=0)` returns the
logprob of every prompt token given the ones before it). With a BOS token, every window starts with
it, so the window's first text token is scored too. Windows either tile the text (stride = window)
or slide by `stride`, each scoring only the tokens the previous window did not reach (more context
per scored token, more compute).
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Window:
    begin: int        # context: text tokens [begin, end)
    end: int
    score_from: int   # scored: text tokens [score_from, end)


@dataclass
class PerplexityResult:
    label: str
    num_tokens: int            # scored tokens
    nll_sum: float             # nats
    num_windows: int
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.num_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    def to_json(self) -> dict:
        return {**asdict(self), "mean_nll": self.mean_nll, "ppl": self.ppl}


def make_windows(num_tokens: int, window: int, stride: int | None = None, has_prefix: bool = True) -> list[Window]:
    """Windows of at most `window` text tokens every `stride` tokens (default: window, no overlap).
    Without a prefix token a window's first token has no context, so the first window scores from
    its second token (later windows always have context for what they score)."""
    stride = stride or window
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    if num_tokens < (1 if has_prefix else 2):
        raise ValueError(f"the text has {num_tokens} tokens; too few to score")
    out, reached = [], 0 if has_prefix else 1
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        if not has_prefix and begin > 0 and reached < begin + 1:
            raise ValueError("without a BOS token, windows must overlap (stride < window)")
        out.append(Window(begin, end, max(reached, begin)))
        reached = end
        if end == num_tokens:
            break
    return out


def bos_prefix(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def window_nll(prompt_logprobs, prompt_ids: list[int], offset: int, first: int, last: int) -> float:
    """Sum of -logprob of prompt tokens [first, last) (indices into the text window, shifted by
    `offset` prefix tokens in the prompt)."""
    total = 0.0
    for k in range(first + offset, last + offset):
        entry = prompt_logprobs[k]
        if entry is None or prompt_ids[k] not in entry:
            raise RuntimeError(f"the engine returned no logprob for prompt position {k}")
        total -= entry[prompt_ids[k]].logprob
    return total


def perplexity(llm, token_ids: list[int], window: int, stride: int | None = None, prefix: list[int] | None = None,
               label: str = "", use_tqdm: bool = True) -> PerplexityResult:
    """Perplexity of `token_ids` (text without special tokens) under `llm`."""
    from herd.engine.sampling_params import SamplingParams

    prefix = list(prefix or [])
    wins = make_windows(len(token_ids), window, stride, bool(prefix))
    prompts = [{"prompt_token_ids": prefix + token_ids[w.begin:w.end]} for w in wins]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    seconds = time.perf_counter() - start
    nll, count = 0.0, 0
    for w, p, o in zip(wins, prompts, outs):
        nll += window_nll(o.prompt_logprobs, p["prompt_token_ids"], len(prefix), w.score_from - w.begin,
                          w.end - w.begin)
        count += w.end - w.score_from
    return PerplexityResult(label, count, nll, len(wins), seconds)


def default_window(max_model_len: int, prefix_len: int) -> int:
    """Text tokens per window: the prompt (prefix + window) must leave room for the 1 sampled token."""
    return max_model_len - 1 - prefix_len


# --compare shorthands -> engine kwargs
SHORTHANDS = {
    "auto": {}, "base": {},
    "bf16": {"dtype": "bfloat16"}, "bfloat16": {"dtype": "bfloat16"},
    "fp16": {"dtype": "float16"}, "float16": {"dtype": "float16"},
    "fp32": {"dtype": "float32"}, "float32": {"dtype": "float32"},
    "fp8": {"quantization": "fp8"}, "fp8-dynamic": {"quantization": "fp8"},
    "inc": {"quantization": "inc"},
    "compressed-tensors": {"quantization": "compressed-tensors"},
    "kv-fp8": {"kv_cache_dtype": "fp8"}, "kv-fp8-inc": {"kv_cache_dtype": "fp8_inc"},
}
_INT_KEYS = {"max_model_len", "block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "seed",
             "tensor_parallel_size"}


def parse_config(spec: str) -> tuple[str, dict]:
    """'fp8' | 'inc,kv-fp8-inc' | 'quantization=fp8,dtype=bfloat16' | '/path/to/checkpoint' |
    'label=mine,model=/path' -> (label, engine-kwarg overrides; 'model' picks another checkpoint)."""
    import os

    label, over = spec, {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in SHORTHANDS:
            over.update(SHORTHANDS[part])
        elif "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            key = key.replace("-", "_")
            if key == "label":
                label = value
            else:
                over[key] = int(value) if key in _INT_KEYS else value
        elif os.path.isdir(part):
            over["model"] = part
        else:
            raise ValueError(f"--compare: {part!r} is neither a shorthand ({', '.join(SHORTHANDS)}), "
                             "a key=value engine option, nor a checkpoint folder")
    return label, over


def recovery(baseline: PerplexityResult, other: PerplexityResult) -> float:
    """Accuracy recovery for a lower-is-better metric: baseline PPL / PPL x 100 (100% = no loss)."""
    return baseline.ppl / other.ppl * 100.0


def free_engine(llm) -> None:
    """Release an engine's workers and memory before the next configuration loads."""
    import torch

    executor = getattr(llm.llm_engine, "executor", None)
    if executor is not None and hasattr(executor, "shutdown"):
        executor.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_table(results: list[PerplexityResult], errors: dict[str, str] | None = None) -> str:
    width = max([len(r.label) for r in results] + [len(k) for k in (errors or {})] + [6])
    lines = [f"{'config':<{width}}  {'tokens':>8}  {'mean NLL':>9}  {'PPL':>10}  {'recovery':>9}"]
    base = results[0] if results else None
    for r in results:
        lines.append(f"{r.label:<{width}}  {r.num_tokens:>8}  {r.mean_nll:>9.5f}  {r.ppl:>10.4f}  "
                     f"{recovery(base, r):>8.2f}%")
    for label, err in (errors or {}).items():
        lines.append(f"{label:<{width}}  failed: {err}")
    return "\n".join(lines)
