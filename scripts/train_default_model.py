#!/usr/bin/env python3
"""Train herd's embedded default model: a tiny Llama 4 text model on the King James Bible.

Steps (all offline): read the text made by scripts/prepare_default_data.py, train a byte-level BPE
tokenizer with Llama 4's special tokens, train a `Llama4ForCausalLM` (MoE + shared expert, dense
layers, chunked attention, a NoPE layer, QK-norm, attention temperature tuning, llama3 RoPE scaling)
with AdamW and a cosine schedule on one CPU thread, and save a standard Hugging Face folder.

    python scripts/prepare_default_data.py
    python scripts/train_default_model.py --steps 1750 --log docs/default_model_training.log

Interrupted runs continue from the last checkpoint with --resume.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_default_data import read_jsonl  # noqa: E402

# Llama 4's named special tokens, in Llama 4's id order; they take the last ids of the vocabulary.
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>", "<|python_start|>",
    "<|python_end|>", "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>",
    "<|tile_x_separator|>", "<|tile_y_separator|>", "<|image|>", "<|patch|>",
]
# Llama 4's pre-tokenisation pattern (o200k style), see shared/spec/llama4.md section 5.1.
SPLIT_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])
# Llama 4 chat format: system text trimmed, image parts -> <|image|>, tool results under `ipython`.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] in ['tool', 'ipython'] else message['role'] %}"
    "{{- '<|header_start|>' + role + '<|header_end|>\\n\\n' }}"
    "{%- set content = message['content'] %}"
    "{%- if content is string %}"
    "{{- content | trim if role == 'system' else content }}"
    "{%- elif content is mapping or role == 'ipython' %}"
    "{{- content | tojson }}"
    "{%- else %}"
    "{%- for part in content %}"
    "{%- if part['type'] in ['image', 'image_url'] %}{{- '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] | trim if role == 'system' else part['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)
VOCAB_SIZE = 4096
SEQ_LEN = 512
PROMPTS = ["In the beginning God created", "And the LORD said unto Moses,", "Blessed are the"]


def train_tokenizer(texts: list[str]):
    """Byte-level BPE (every byte is a token, so any input encodes) + Llama 4 special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != VOCAB_SIZE - len(SPECIAL_TOKENS):
        raise RuntimeError(f"BPE produced {tok.get_vocab_size()} tokens; the text is too small for the vocab")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
        pad_token="<|finetune_right_pad|>", chat_template=CHAT_TEMPLATE, model_max_length=2048,
        clean_up_tokenization_spaces=False)


def build_config(tokenizer):
    from transformers import Llama4TextConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Llama4TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.02,
        # layers 1 and 3: 4 routed experts (top-1) + shared expert; layers 0 and 2: dense SwiGLU
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        # layers 0-2: RoPE + QK-norm + 128-token chunked attention; layer 3: NoPE, global, temperature-tuned
        no_rope_layers=[1, 1, 1, 0], attention_chunk_size=128, use_qk_norm=True,
        attn_temperature_tuning=True, floor_scale=32, attn_scale=0.1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        bos_token_id=ids["<|begin_of_text|>"], pad_token_id=ids["<|finetune_right_pad|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
        tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0,
    )


def encode_documents(tokenizer, data_dir: str) -> list[list[int]]:
    """Chapters as <|begin_of_text|> prose <|end_of_text|>; chats rendered with the chat template."""
    eot = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    docs = [tokenizer(d["text"])["input_ids"] + [eot] for d in read_jsonl(os.path.join(data_dir, "train.jsonl"))]
    for c in read_jsonl(os.path.join(data_dir, "chat.jsonl")):
        text = tokenizer.apply_chat_template(c["messages"], tokenize=False)
        docs.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return docs


class TokenStream:
    """Deterministic packing: epoch e is the documents shuffled with seed+e, concatenated."""

    def __init__(self, docs: list[list[int]], seed: int):
        self.docs, self.seed, self.epochs = docs, seed, []

    def _epoch(self, e: int) -> torch.Tensor:
        while len(self.epochs) <= e:
            order = list(range(len(self.docs)))
            random.Random(self.seed + len(self.epochs)).shuffle(order)
            self.epochs.append(torch.tensor([t for i in order for t in self.docs[i]], dtype=torch.long))
        return self.epochs[e]

    def batch(self, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        n = len(self._epoch(0))
        per_epoch = n // seq_len
        rows = []
        for r in range(step * batch_size, (step + 1) * batch_size):
            e, k = divmod(r, per_epoch)
            rows.append(self._epoch(e)[k * seq_len:(k + 1) * seq_len])
        return torch.stack(rows)


def heldout_windows(tokenizer, data_dir: str, seq_len: int) -> list[torch.Tensor]:
    eot = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    ids = [t for d in read_jsonl(os.path.join(data_dir, "heldout.jsonl")) for t in tokenizer(d["text"])["input_ids"] + [eot]]
    return [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]


def balance_loss(router_logits, num_experts: int) -> torch.Tensor:
    """Switch-style load balancing: num_experts * sum_e(fraction routed to e * mean router prob of e)."""
    total = 0.0
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        frac = F.one_hot(logits.argmax(-1), num_experts).float().mean(0)
        total = total + num_experts * (frac * probs.mean(0)).sum()
    return total / max(len(router_logits), 1)


@torch.no_grad()
def evaluate(model, windows: list[torch.Tensor]) -> float:
    model.eval()
    nll, n = 0.0, 0
    for w in windows:
        out = model(input_ids=w[None], labels=w[None])
        nll += out.loss.item() * (len(w) - 1)
        n += len(w) - 1
    model.train()
    return nll / n


@torch.no_grad()
def samples(model, tokenizer, max_new_tokens: int = 40) -> list[str]:
    model.eval()
    texts = []
    for p in PROMPTS:
        ids = tokenizer(p, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    model.train()
    return texts


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def save_model(model, tokenizer, out: str) -> None:
    from transformers import GenerationConfig

    os.makedirs(out, exist_ok=True)
    cfg = model.config
    # bf16: the dtype Llama 4 checkpoints ship in; halves the file (about 11 MB instead of 23 MB)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                     do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(out)
    _embed_chat_template(out)


def _embed_chat_template(out: str) -> None:
    """Keep the chat template inside tokenizer_config.json, where Llama 4 checkpoints carry it."""
    jinja = os.path.join(out, "chat_template.jinja")
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class name transformers 4.x and 5.x both know
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if os.path.exists(jinja):
        os.remove(jinja)


class Log:
    def __init__(self, path: str | None):
        self.f = open(path, "a", buffering=1) if path else None

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        tqdm.write(line)
        if self.f:
            self.f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="build/default_model/data")
    ap.add_argument("--out", default="herd/assets/default")
    ap.add_argument("--work", default="build/default_model", help="checkpoints and the tokenizer in training")
    ap.add_argument("--log", default=None, help="append the training log to this file")
    ap.add_argument("--steps", type=int, default=1750)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="weight of the expert load-balancing loss")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    from transformers import Llama4ForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = Log(args.log)
    if not os.path.exists(os.path.join(args.data, "train.jsonl")):
        raise SystemExit(f"no data in {args.data}: run scripts/prepare_default_data.py first")
    tok_dir = os.path.join(args.work, "tokenizer")
    ckpt = os.path.join(args.work, "checkpoint.pt")
    if args.resume and os.path.exists(ckpt):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        texts = [d["text"] for d in read_jsonl(os.path.join(args.data, "train.jsonl"))]
        texts += [m["content"] for c in read_jsonl(os.path.join(args.data, "chat.jsonl")) for m in c["messages"]]
        tokenizer = train_tokenizer(texts)
        tokenizer.save_pretrained(tok_dir)
    config = build_config(tokenizer)
    model = Llama4ForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    stream = TokenStream(encode_documents(tokenizer, args.data), args.seed)
    windows = heldout_windows(tokenizer, args.data, args.seq_len)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    start = 0
    if args.resume and os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"resumed from {ckpt} at step {start}")
    else:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"command: {' '.join(sys.argv)}")
        log(f"params {n_params:,}; stream {len(stream._epoch(0)):,} tokens/epoch; "
            f"{len(windows)} held-out windows of {args.seq_len}; {args.batch_size * args.seq_len} tokens/step")
        log(f"config: {config.to_json_string(use_diff=True)}")
    model.train()
    t0, seen = time.time(), 0
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, mininterval=30, file=sys.stderr)
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = stream.batch(step, args.batch_size, args.seq_len)
        out = model(input_ids=x, labels=x, output_router_logits=True)
        aux = balance_loss(out.router_logits, config.num_local_experts)
        loss = out.loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += x.numel()
        if step % 10 == 0 or step == args.steps - 1:
            rate = seen / (time.time() - t0)
            log(f"step {step:5d} loss {out.loss.item():.4f} aux {aux.item():.3f} lr {lr:.2e} "
                f"gnorm {gnorm.item():.2f} tok/s {rate:.0f} epoch {(step + 1) * x.numel() / len(stream._epoch(0)):.2f}")
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            h = evaluate(model, windows)
            log(f"step {step:5d} heldout loss {h:.4f} ppl {math.exp(h):.2f}")
            for s in samples(model, tokenizer, 24):
                log(f"  sample: {s!r}")
        if (step + 1) % args.ckpt_every == 0 or step == args.steps - 1:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    log(f"final train loss {out.loss.item():.4f}; elapsed this run {time.time() - t0:.0f}s")
    save_model(model, tokenizer, args.out)
    log(f"saved to {args.out}")


if __name__ == "__main__":
    main()
