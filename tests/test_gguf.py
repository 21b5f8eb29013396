"""GGUF: dequantization (gguf's numpy dequantizers, read through herd), conversion of a tiny GGUF
written from a random transformers Llama into an HF folder, tokenizer and chat template rebuilt
from the metadata, and parity of herd on the converted folder with transformers."""
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF path needs the `gguf` package (pip install 'gguf>=0.10')")

from herd import LLM, SamplingParams  # noqa: E402
from herd.gguf import convert as hg  # noqa: E402
from herd.model.loader import load_model  # noqa: E402
from tests.test_llama_dense import load_hf_llama, make_tiny_llama  # noqa: E402
from tests.tiny_models import CHAT_TEMPLATE  # noqa: E402

Q = gguf.GGMLQuantizationType


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, Q]], meta=None, arch="llama"):
    """tensors: name -> (float32 array in [out, in] order, type); quantized with gguf's quantize."""
    w = gguf.GGUFWriter(str(path), arch)
    for fn, value in (meta or {}).items():
        getattr(w, fn)(value)
    for name, (arr, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float32 if qtype == Q.F32 else np.float16))
        elif arr.dtype == np.uint8:  # blocks already encoded
            w.add_tensor(name, arr, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def read_tensor(path, name):
    return next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)


# ---- dequantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("qtype, tol", [(Q.Q4_0, 0.55), (Q.Q4_1, 0.3), (Q.Q8_0, 0.02), (Q.Q5_0, 0.25),
                                        (Q.BF16, 0.01), (Q.F16, 1e-3)])
def test_dequantize_roundtrip(tmp_path, qtype, tol):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 96)).astype(np.float32) * 2  # [out, in], not square: order matters
    path = write_gguf(tmp_path / "t.gguf", {"w": (x, qtype)})
    t = read_tensor(path, "w")
    assert list(t.shape) == [96, 6]  # GGUF shapes list the fastest dimension first
    y = hg.dequantize(t)
    assert y.shape == x.shape and y.dtype == np.float32
    if qtype not in (Q.F16,):
        expected = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)
        np.testing.assert_array_equal(y, expected)
    # per 32-value block, the error is bounded by a fraction of the block's range
    err = np.abs(y - x).reshape(6, -1, 32).max(-1) / np.abs(x).reshape(6, -1, 32).max(-1)
    assert err.max() <= tol
    assert np.abs(y - x).max() > 0 or qtype == Q.F32


def encode_q4_k(d, dmin, sc, mn, q) -> bytes:
    """One Q4_K block (256 values): d, dmin (f16), 12 bytes of 6-bit scales/mins for 8 sub-blocks of
    32, then 4-bit quants; value = d * sc[s] * q - dmin * mn[s]."""
    scales = np.zeros(12, np.uint8)
    for j in range(4):
        scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        scales[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6)
        scales[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4)
    qs = np.zeros(128, np.uint8)
    for c in range(4):
        qs[32 * c:32 * c + 32] = q[64 * c:64 * c + 32] | (q[64 * c + 32:64 * c + 64] << 4)
    return np.float16(d).tobytes() + np.float16(dmin).tobytes() + scales.tobytes() + qs.tobytes()


def encode_q6_k(d, scales, q) -> bytes:
    """One Q6_K block: ql (low 4 bits), qh (high 2 bits), 16 int8 scales, d (f16);
    value = d * scales[s] * (q - 32) with 16 sub-blocks of 16."""
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for n in range(2):
        for part in range(4):
            for l in range(32):
                v = int(q[128 * n + 32 * part + l])
                lo = 64 * n + l + (32 if part in (1, 3) else 0)
                ql[lo] |= (v & 0xF) << (4 if part >= 2 else 0)
                qh[32 * n + l] |= (v >> 4) << (2 * part)
    return ql.tobytes() + qh.tobytes() + np.asarray(scales, np.int8).tobytes() + np.float16(d).tobytes()


def q4_k_expected(d, dmin, sc, mn, q):
    sub = np.arange(256) // 32
    return np.float32(np.float16(d)) * sc[sub] * q - np.float32(np.float16(dmin)) * mn[sub]


def q6_k_expected(d, scales, q):
    idx = np.arange(256)
    half, part, l = idx // 128, (idx % 128) // 32, idx % 32
    s = 8 * half + l // 16 + 2 * part
    return np.float32(np.float16(d)) * scales[s] * (q.astype(np.float32) - 32)


def test_dequantize_k_quants_on_known_blocks(tmp_path):
    rng = np.random.default_rng(1)
    rows4, expect4, rows6, expect6 = [], [], [], []
    for _ in range(3):  # 3 rows of one block each
        d, dmin = rng.uniform(0.01, 0.1), rng.uniform(0.0, 0.05)
        sc, mn = rng.integers(0, 64, 8), rng.integers(0, 64, 8)
        q = rng.integers(0, 16, 256).astype(np.uint8)
        rows4.append(np.frombuffer(encode_q4_k(d, dmin, sc, mn, q), np.uint8))
        expect4.append(q4_k_expected(d, dmin, sc, mn, q))
        scales = rng.integers(-128, 128, 16)
        q6 = rng.integers(0, 64, 256).astype(np.uint8)
        rows6.append(np.frombuffer(encode_q6_k(d, scales, q6), np.uint8))
        expect6.append(q6_k_expected(d, scales, q6))
    path = write_gguf(tmp_path / "k.gguf", {"a": (np.stack(rows4), Q.Q4_K), "b": (np.stack(rows6), Q.Q6_K)})
    np.testing.assert_allclose(hg.dequantize(read_tensor(path, "a")), np.stack(expect4), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(hg.dequantize(read_tensor(path, "b")), np.stack(expect6), rtol=1e-6, atol=1e-6)


def test_qk_permutation_is_inverted():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    p = hg.permute_qk(w, 4)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(hg.unpermute_qk(p, 4), w)
    # within a head, llama.cpp row 2i + a is HF row a * d/2 + i
    assert p[2 * 3 + 1, 0] == w[8 + 3, 0] and p[2 * 3, 0] == w[3, 0]


# ---- conversion of a tiny model ----------------------------------------------------------------

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def tokenizer_meta(folder):
    with open(os.path.join(folder, "tokenizer.json")) as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    specials = {t["content"] for t in tj["added_tokens"] if t["special"]}
    tokens = [None] * 320
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [3 if t in specials else 1 for t in tokens]
    for i, t in enumerate(tokens):
        if t is None:  # the padded tail of the embedding (llama.cpp's [PADn] unused tokens)
            tokens[i], types[i] = f"[PAD{i}]", 5
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return {"add_tokenizer_model": "gpt2", "add_tokenizer_pre": "default", "add_token_list": tokens,
            "add_token_types": types, "add_token_merges": merges, "add_bos_token_id": 1, "add_eos_token_id": 2,
            "add_pad_token_id": 0, "add_add_bos_token": True, "add_chat_template": CHAT_TEMPLATE}


def gguf_from_hf(folder, out, types=lambda name: Q.F32):
    """Write a llama GGUF (llama.cpp's layout, q/k rows permuted) from a HF Llama folder."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    sd = load_file(os.path.join(folder, "model.safetensors"))
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = {}
    for name, t in sd.items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            g = f"blk.{i}.{_LAYER[rest.rsplit('.', 1)[0]]}.weight"
            if g.endswith("attn_q.weight"):
                a = hg.permute_qk(a, H)
            elif g.endswith("attn_k.weight"):
                a = hg.permute_qk(a, Hkv)
        tensors[g] = (a, Q.F32 if a.ndim == 1 else types(g))
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    meta = {"add_block_count": cfg["num_hidden_layers"], "add_context_length": cfg["max_position_embeddings"],
            "add_embedding_length": cfg["hidden_size"], "add_feed_forward_length": cfg["intermediate_size"],
            "add_head_count": H, "add_head_count_kv": Hkv, "add_rope_freq_base": theta,
            "add_layer_norm_rms_eps": cfg["rms_norm_eps"], "add_rope_dimension_count": cfg["head_dim"],
            "add_vocab_size": cfg["vocab_size"], **tokenizer_meta(folder)}
    return write_gguf(out, tensors, meta)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    # plain RoPE (GGUF files carry llama3 scaling as a rope_freqs tensor, which is rejected)
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), "plain")


def test_f32_gguf_converts_exactly(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    path = gguf_from_hf(tiny_llama, tmp_path / "tiny-f32.gguf")
    folder = hg.gguf_to_hf(path, tmp_path / "cache", dtype="float32", progress=False)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 4, 16)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["torch_dtype"] == "float32"
    # a second call reuses the cached folder
    mtime = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    assert hg.gguf_to_hf(path, tmp_path / "cache", dtype="float32") == folder
    assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == mtime

    hf = load_hf_llama(tiny_llama)
    model = load_model(folder, dtype=torch.float32)
    ids = torch.randint(3, 300, (33,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
        ours = model.compute_logits(model(ids, torch.arange(33)))
    assert (ours - ref).abs().max().item() <= 1e-4

    orig, rebuilt = AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(folder)
    for text in ["The quick brown fox jumps", "héllo wörld, naïve café 日本語 🙂", "a  b\n\nc <|eot|> d"]:
        assert rebuilt.encode(text) == orig.encode(text)
        assert rebuilt.decode(rebuilt.encode(text), skip_special_tokens=True) == \
            orig.decode(orig.encode(text), skip_special_tokens=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert rebuilt.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        orig.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    with open(os.path.join(folder, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] in (2, [2], [2, 5])


def test_cached_files_are_readable_by_others(tiny_llama, tmp_path):
    """Every file of the converted folder is 0644 like herd quantize's output (safetensors writes
    0600), whatever the umask; the folder itself keeps the umask's mode."""
    import stat

    path = gguf_from_hf(tiny_llama, tmp_path / "tiny-f32.gguf")
    old = os.umask(0o077)
    try:
        folder = hg.gguf_to_hf(path, tmp_path / "cache", dtype="float32", progress=False)
    finally:
        os.umask(old)
    modes = {f: stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode) for f in os.listdir(folder)}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o644), {f: oct(m) for f, m in modes.items()}


def test_quantized_gguf_through_engine(tiny_llama, tmp_path, monkeypatch):
    """Q8_0 / Q4_0 / Q4_1 / F16 tensors: converted weights are the dequantized ones, herd on the
    folder matches transformers on the folder, and LLM("x.gguf") runs the same model."""
    from safetensors.torch import load_file

    kinds = {"ffn_down": Q.Q4_0, "ffn_up": Q.Q4_1, "token_embd": Q.F16, "output": Q.Q8_0}

    def types(name):
        return next((q for k, q in kinds.items() if f"{k}.weight" in name), Q.Q8_0)

    path = gguf_from_hf(tiny_llama, tmp_path / "tiny-q.gguf", types)
    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "herd_cache"))
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=96)
    folder = llm.config.model.model
    assert folder.startswith(str(tmp_path / "herd_cache" / "gguf"))
    orig, conv = load_file(os.path.join(tiny_llama, "model.safetensors")), load_file(
        os.path.join(folder, "model.safetensors"))
    assert set(conv) == set(orig)
    for name, t in orig.items():
        err = (conv[name] - t).abs().max().item()
        bound = 0.02 * t.abs().max().item() if "down_proj" not in name and "up_proj" not in name else \
            0.3 * t.abs().max().item()
        assert err <= bound, name
    # gguf's own dequantization of q (then the row order put back) is what was written
    q_gguf = hg.unpermute_qk(hg.dequantize(read_tensor(path, "blk.1.attn_q.weight")), 4)
    assert torch.equal(conv["model.layers.1.self_attn.q_proj.weight"], torch.from_numpy(q_gguf))

    hf = load_hf_llama(folder)
    outs = llm.generate(["The quick brown fox", "Mixture of experts"],
                        SamplingParams(temperature=0, max_tokens=16, min_tokens=16), use_tqdm=False)
    for o in outs:
        ids = torch.tensor([o.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert o.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert chat[0].prompt_token_ids[0] == 1  # the GGUF template's bos_token


def test_unsupported_gguf_is_rejected(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", {"token_embd.weight": (np.zeros((8, 32), np.float32), Q.F32)},
                      arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        hg.gguf_to_hf(path, tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*"))  # nothing half-written is left
    with pytest.raises(FileNotFoundError):
        hg.gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "cache")


def test_convert_command_runs_without_runpy_warning():
    # `python -m herd.gguf.convert` must not be imported by the package first (runpy then warns and
    # runs a second copy of the module)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "herd.gguf.convert", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr and "found in sys.modules" not in proc.stderr
    assert "usage" in proc.stdout.lower()
    import herd.gguf

    assert herd.gguf.is_gguf_path is hg.is_gguf_path
    with pytest.raises(AttributeError):
        herd.gguf.no_such_name  # noqa: B018
