"""Benchmark prompts: random (exact token length), ShareGPT JSON and JSONL files. Local files only.

A `Tokenizer` here is anything with `encode(text) -> ids` (no special tokens) and
`decode(ids) -> text`: a local HF tokenizer folder or the server's /tokenize and /detokenize.
Without one, lengths are counted in words (a rough stand-in for tokens).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

# Plain English words for random prompts; every one is at least one token in any tokenizer.
_WORDS = ("the of and to in is was for that with as on by at from his her they we you this are be "
          "have not but had all were when one there what so out up into time day year man woman people "
          "world life hand part child eye place work week case point number group problem fact house "
          "water light river mountain city road field garden window door table paper story music voice "
          "morning evening night summer winter spring autumn green blue red white black small large "
          "old new long short high low early late young quick slow bright dark warm cold open close "
          "read write speak listen walk run carry build learn teach find keep give take bring begin").split()


@dataclass
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int          # tokens (or words when no tokenizer was available)
    expected_output_len: int


class HFTokenizer:
    """A local Hugging Face tokenizer folder (no special tokens added)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        self.name = path

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class ServerTokenizer:
    """The server's own tokenizer through /tokenize and /detokenize (herd and vLLM have both)."""

    def __init__(self, base_url: str, model: str, headers: dict | None = None, timeout: float = 30.0):
        import httpx
        self.client = httpx.Client(base_url=base_url, headers=headers or {}, timeout=timeout)
        self.model = model
        self.name = f"{base_url} (/tokenize)"

    @classmethod
    def probe(cls, base_url: str, model: str, headers: dict | None = None) -> "ServerTokenizer | None":
        """The server tokenizer if the endpoints answer, else None."""
        import httpx
        tok = cls(base_url, model, headers)
        try:
            ids = tok.encode("hello world")
            if ids and isinstance(tok.decode(ids), str):
                return tok
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        tok.client.close()
        return None

    def encode(self, text: str) -> list[int]:
        r = self.client.post("/tokenize", json={"model": self.model, "prompt": text, "add_special_tokens": False})
        r.raise_for_status()
        return list(r.json()["tokens"])

    def decode(self, ids: list[int]) -> str:
        r = self.client.post("/detokenize", json={"model": self.model, "tokens": list(ids)})
        r.raise_for_status()
        return r.json()["prompt"]


def count_tokens(text: str, tokenizer) -> int:
    return len(tokenizer.encode(text)) if tokenizer is not None else len(text.split())


def _lengths(mean: int, range_ratio: float, n: int, rng: random.Random) -> list[int]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def exact_length_text(n: int, tokenizer, rng: random.Random, tries: int = 8) -> tuple[str, int]:
    """Random words cut to `n` tokens. Cutting and re-encoding can merge or split one token at
    the cut, so the cut is repeated until the text re-encodes to exactly n tokens (or `tries` runs
    out: the last length is returned)."""
    words = [rng.choice(_WORDS) for _ in range(n + 8)]
    if tokenizer is None:
        return " ".join(words[:n]), n
    ids = tokenizer.encode(" ".join(words))
    text, got = "", 0
    for _ in range(tries):
        while len(ids) < n:  # a cut that lost tokens: top up with more words
            ids = ids + tokenizer.encode(" " + " ".join(rng.choice(_WORDS) for _ in range(n - len(ids) + 4)))
        text = tokenizer.decode(ids[:n])
        ids = tokenizer.encode(text)
        got = len(ids)
        if got == n:
            break
    return text, got


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    tokenizer=None, seed: int = 0, prefix_len: int = 0) -> list[SampleRequest]:
    """`num_prompts` prompts of ~input_len tokens (exact when a tokenizer is given), each with its own
    random words so no prefix is shared, unless `prefix_len` tokens of a common prefix are asked for."""
    rng = random.Random(seed)
    in_lens = _lengths(input_len, range_ratio, num_prompts, rng)
    out_lens = _lengths(output_len, range_ratio, num_prompts, rng)
    prefix = exact_length_text(prefix_len, tokenizer, rng)[0] + " " if prefix_len else ""
    out = []
    for i_len, o_len in zip(in_lens, out_lens):
        text, got = exact_length_text(i_len, tokenizer, rng)
        out.append(SampleRequest(prefix + text, got + prefix_len, o_len))
    return out


def random_token_requests(num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                          range_ratio: float = 0.0, seed: int = 0, skip_ids: set[int] | None = None
                          ) -> list[SampleRequest]:
    """Prompts as random token ids (offline benchmarks, where no text round-trip is needed)."""
    rng = random.Random(seed)
    in_lens = _lengths(input_len, range_ratio, num_prompts, rng)
    out_lens = _lengths(output_len, range_ratio, num_prompts, rng)
    allowed = [t for t in range(vocab_size) if t not in (skip_ids or set())]
    return [SampleRequest([rng.choice(allowed) for _ in range(i)], i, o) for i, o in zip(in_lens, out_lens)]


def sharegpt_requests(path: str, num_prompts: int, tokenizer=None, output_len: int | None = None,
                      seed: int = 0, max_prompt_len: int = 1024, max_total_len: int = 2048
                      ) -> list[SampleRequest]:
    """First human turn as prompt, first reply's length as output length (vLLM's ShareGPT rules:
    pairs shorter than 4 tokens, prompts over 1024 and pairs over 2048 tokens are skipped)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{'conversations': [...]}} entries")
    convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    out = []
    for conv in convs:
        prompt, reply = conv[0]["value"], conv[1]["value"]
        p_len = count_tokens(prompt, tokenizer)
        o_len = output_len if output_len is not None else count_tokens(reply, tokenizer)
        if p_len < 4 or o_len < 4 or p_len > max_prompt_len or p_len + o_len > max_total_len:
            continue
        out.append(SampleRequest(prompt, p_len, o_len))
        if len(out) == num_prompts:
            break
    if not out:
        raise ValueError(f"{path}: no usable conversations")
    return out


def jsonl_requests(path: str, num_prompts: int, output_len: int, tokenizer=None) -> list[SampleRequest]:
    """One JSON object per line with a "prompt" and optionally "output_tokens" (else --output-len);
    the file is cycled when it has fewer lines than --num-prompts."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if "prompt" not in obj:
                raise ValueError(f"{path}:{lineno}: each line needs a \"prompt\" field")
            rows.append(obj)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    out = []
    for i in range(num_prompts):
        obj = rows[i % len(rows)]
        o_len = int(obj.get("output_tokens", obj.get("max_tokens", output_len)))
        out.append(SampleRequest(obj["prompt"], count_tokens(obj["prompt"], tokenizer), o_len))
    return out


DATASETS = ("random", "sharegpt-json", "jsonl")


def load_requests(args, tokenizer=None) -> list[SampleRequest]:
    """The benchmark's prompts from the CLI flags shared by `bench serve` and `bench throughput`."""
    name = args.dataset_name
    if name in ("sharegpt-json", "jsonl") and not args.dataset_path:
        raise ValueError(f"--dataset {name} needs --dataset-path FILE")
    if name == "random":
        return random_requests(args.num_prompts, args.input_len, args.output_len, args.random_range_ratio,
                               tokenizer, args.seed, args.random_prefix_len)
    if name == "sharegpt-json":
        return sharegpt_requests(args.dataset_path, args.num_prompts, tokenizer, args.sharegpt_output_len,
                                 args.seed)
    if name == "jsonl":
        return jsonl_requests(args.dataset_path, args.num_prompts, args.output_len, tokenizer)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def add_dataset_args(parser, input_len: int = 1024, output_len: int = 128, num_prompts: int = 1000,
                     with_seed: bool = True):
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset-name", "--dataset", "--dataset_name", dest="dataset_name", default="random",
                   choices=DATASETS, help="where prompts come from (default: random)")
    g.add_argument("--dataset-path", "--dataset_path", dest="dataset_path", default=None,
                   help="local ShareGPT .json or .jsonl file")
    g.add_argument("--num-prompts", "--num_prompts", dest="num_prompts", type=int, default=num_prompts)
    g.add_argument("--input-len", "--random-input-len", "--input_len", "--random_input_len", dest="input_len",
                   type=int, default=input_len, help="prompt tokens (random dataset)")
    g.add_argument("--output-len", "--random-output-len", "--output_len", "--random_output_len",
                   dest="output_len", type=int, default=output_len,
                   help="tokens to generate (random and jsonl datasets)")
    g.add_argument("--random-range-ratio", "--random_range_ratio", dest="random_range_ratio", type=float,
                   default=0.0, help="lengths drawn uniformly in [len*(1-r), len*(1+r)]")
    g.add_argument("--random-prefix-len", "--random_prefix_len", dest="random_prefix_len", type=int, default=0,
                   help="tokens of a prefix shared by all random prompts")
    g.add_argument("--sharegpt-output-len", "--sharegpt_output_len", dest="sharegpt_output_len", type=int,
                   default=None, help="override the ShareGPT reply lengths")
    if with_seed:  # offline benchmarks get --seed from the engine flags
        g.add_argument("--seed", type=int, default=0, help="seed for prompts and arrival times")
