"""GGUF (llama.cpp) files: convert one into a Hugging Face checkpoint folder that herd loads.

The folder holds config.json (LlamaForCausalLM), model.safetensors with the weights dequantized
to bf16 / fp16 / fp32, tokenizer.json rebuilt with the `tokenizers` library from the
tokenizer.ggml.* metadata, tokenizer_config.json (chat template, special tokens) and
generation_config.json. It is written once into a cache folder keyed by the file's path, size and
mtime, and reused afterwards. Dequantization (Q4_0, Q4_1, Q8_0, K-quants, ...) is the `gguf`
package's own (`gguf.quants.dequantize`).

llama.cpp stores attn_q / attn_k with each head's rows reordered so that its interleaved RoPE
(pairs 2i, 2i+1) equals HF Llama's rotate-half RoPE (pairs i, i + d/2); the rows are put back here
so the folder is a plain HF Llama checkpoint (transformers loads it too).

    python -m herd.gguf.convert FILE.gguf [--dtype bfloat16]   # convert and print the folder
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from herd.hub.herd_cache import herd_cache_dir

logger = logging.getLogger(__name__)
CONVERTER_VERSION = 1
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SHARD_BYTES = 2 << 30

# GGUF tensor names (llama architecture) -> HF LlamaForCausalLM names
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# tokenizer.ggml.pre -> pre-tokenizer family (llama.cpp's regex sets, rebuilt with `tokenizers`)
_PRE_GPT2 = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_PRE_DIGITS = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_PRE_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# End-of-generation tokens llama.cpp also recognises by their text.
_EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>",
              "<|end|>", "<|eot|>")
_CONTROL, _USER_DEFINED = 3, 4


def is_gguf_path(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".gguf")


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf files needs the `gguf` package: pip install 'gguf>=0.19'") from None
    return gguf


# ---- metadata ----------------------------------------------------------------------------------

def read_metadata(reader) -> dict[str, Any]:
    """Every key/value field as a Python value (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def llama_config(meta: dict[str, Any], tensor_names: set[str], dtype: str) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (herd converts 'llama' GGUF files)")
    p = "llama."
    if meta.get(p + "expert_count"):
        raise ValueError("GGUF llama files with experts (Mixtral-style MoE) are not supported")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("this GGUF carries rope_freqs (Llama 3.1+ long-context RoPE factors), which herd "
                         "does not convert yet")
    if any(n.endswith(".bias") for n in tensor_names):
        raise ValueError("GGUF llama files with bias tensors are not supported")
    hidden, heads = int(meta[p + "embedding_length"]), int(meta[p + "attention.head_count"])
    kv_heads = meta.get(p + "attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ValueError("GGUF files with a per-layer head_count_kv are not supported")
    head_dim = int(meta.get(p + "attention.key_length") or hidden // heads)
    rot = int(meta.get(p + "rope.dimension_count") or head_dim)
    if rot != head_dim:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count {rot} < head_dim {head_dim}) "
                         "are not supported")
    scaling = meta.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(meta.get(p + "vocab_size") or len(tokens)),
        "hidden_size": hidden, "intermediate_size": int(meta[p + "feed_forward_length"]),
        "num_hidden_layers": int(meta[p + "block_count"]), "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads), "head_dim": head_dim,
        "rms_norm_eps": float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
    }
    # round-trip through float32 leaves eps like 9.999999747e-06; keep the value the model was trained with
    cfg["rms_norm_eps"] = float(np.format_float_positional(np.float32(cfg["rms_norm_eps"]), unique=True))
    return cfg


# ---- tensors -----------------------------------------------------------------------------------

def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major) order: GGUF shape [in, out] -> [out, in]."""
    gguf = _require_gguf()
    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{tensor.name}: GGUF type {tensor.tensor_type.name} cannot be dequantized "
                         "by the installed gguf package") from None
    return np.asarray(data, dtype=np.float32).reshape(shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order for attn_q / attn_k. llama.cpp puts HF row
    a * d/2 + i (a in {0, 1}) of a head at row 2i + a; this maps the rows back."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> llama.cpp's (the inverse of unpermute_qk; used to write GGUF files)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {name!r} for the llama architecture")


def hf_tensors(reader, cfg: dict, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    # disable=None: the bar shows on a terminal only
    for t in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress or None,
                  leave=False):
        name = hf_name(t.name)
        w = dequantize(t)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, kv_heads)
        w = np.ascontiguousarray(w)
        if not w.flags.writeable:  # a view into the memory-mapped file
            w = w.copy()
        yield name, torch.from_numpy(w).to(dtype)


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out: Path,
                      shard_bytes: int = _SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000N.safetensors shards + index past shard_bytes."""
    from safetensors.torch import save_file

    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            fname = f"model-{len(shards) + 1:05d}.safetensors"
            logger.info("writing %s (%.0f MB)", fname, size / 1e6)
            save_file(current, str(out / fname), metadata={"format": "pt"})
            shards.append(fname)
            weight_map.update({k: fname for k in current})
            current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name], size = t, size + nbytes
    flush()
    if len(shards) == 1:
        os.replace(out / shards[0], out / "model.safetensors")
        return ["model.safetensors"]
    total = sum((out / s).stat().st_size for s in shards)
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return shards


# ---- tokenizer ---------------------------------------------------------------------------------

def build_tokenizer(meta: dict[str, Any]):
    """A transformers fast tokenizer from tokenizer.ggml.* (byte-level BPE, "gpt2" model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (herd rebuilds 'gpt2' byte-level "
                         "BPE tokenizers)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_GPT2:
        pre_tok, ignore_merges = byte_level, False
    elif pre in _PRE_DIGITS:
        pre_tok, ignore_merges = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                          byte_level]), False
    elif pre in _PRE_LLAMA3:
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        ignore_merges = True
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: "
                         f"{', '.join(_PRE_GPT2 + _PRE_DIGITS + _PRE_LLAMA3)}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos, add_eos = bool(meta.get("tokenizer.ggml.add_bos_token", False)), bool(
        meta.get("tokenizer.ggml.add_eos_token", False))
    head = [bos] if add_bos and bos else []
    tail = [eos] if add_eos and eos else []
    if head or tail:
        tok.post_processor = processors.TemplateProcessing(
            single=head + ["$A:0"] + tail, pair=head + ["$A:0"] + tail + head + ["$B:1"] + tail,
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(head + tail)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token("unknown"),
                                   pad_token=token("padding"), clean_up_tokenization_spaces=False)
    template = meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def eos_token_ids(meta: dict[str, Any]) -> list[int]:
    """eos, eot and eom ids, plus control tokens llama.cpp treats as end of generation by text."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    ids += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == _CONTROL and t in _EOG_TEXTS]
    return sorted({int(i) for i in ids if i is not None})


# ---- conversion --------------------------------------------------------------------------------

def cache_folder(path, cache_root, dtype: str = "bfloat16") -> Path:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{dtype}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = Path(path).name[: -len(".gguf")]
    return Path(cache_root) / f"{stem}-{dtype}-{digest}"


def convert_gguf(path, out_dir, dtype: str = "bfloat16", progress: bool = True) -> str:
    """Write the HF folder for GGUF `path` into out_dir (written to a temporary folder first,
    then renamed, so a partial conversion is never used)."""
    gguf = _require_gguf()
    if dtype not in _DTYPES:
        raise ValueError(f"GGUF conversion dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    logger.info("converting %s into a Hugging Face checkpoint at %s (once; later runs reuse it)",
                Path(path).name, out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        reader = gguf.GGUFReader(os.fspath(path))
        meta = read_metadata(reader)
        cfg = llama_config(meta, {t.name for t in reader.tensors}, dtype)
        eos = eos_token_ids(meta)
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        tokenizer = build_tokenizer(meta)
        tokenizer.save_pretrained(str(tmp))
        write_safetensors(hf_tensors(reader, cfg, _DTYPES[dtype], progress), tmp)
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
        if cfg["pad_token_id"] is not None:
            gen["pad_token_id"] = cfg["pad_token_id"]
        for name, data in (("config.json", cfg), ("generation_config.json", gen)):
            with open(tmp / name, "w") as f:
                json.dump(data, f, indent=2)
        with open(tmp / "gguf_source.json", "w") as f:
            json.dump({"file": os.path.abspath(path), "converter_version": CONVERTER_VERSION,
                       "general.name": meta.get("general.name"), "file_type": meta.get("general.file_type")},
                      f, indent=2)
        # safetensors writes 0600 (a temporary file renamed), and a strict umask would make the rest
        # private too: the cache is shared, so every file gets 0644 like herd quantize's output
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o644)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same conversion first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def gguf_cache_dir() -> str:
    """Where converted GGUF files go: gguf/ of herd's cache (herd.hub.herd_cache)."""
    return herd_cache_dir("gguf")


def gguf_to_hf(path, cache_root, dtype: str = "bfloat16", progress: bool = True) -> str:
    """The HF folder for GGUF `path` under cache_root, converting on first use."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {os.fspath(path)!r} does not exist")
    out = cache_folder(path, cache_root, dtype)
    if (out / "config.json").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(path, out, dtype, progress)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m herd.gguf.convert",
                                     description="convert a llama GGUF file into a HF checkpoint folder")
    parser.add_argument("file")
    parser.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    parser.add_argument("--output", default=None, help="folder to write (default: herd's GGUF cache)")
    args = parser.parse_args(argv)
    if args.output:
        print(convert_gguf(args.file, args.output, args.dtype))
    else:
        print(gguf_to_hf(args.file, gguf_cache_dir(), args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
