"""FP8 accuracy: perplexity of each FP8 mode within 1% of the model dtype (default model and tiny
checkpoints), and the report `herd quantize` prints and saves."""
import json
import math
import os

import pytest
import torch

from herd import LLM, SamplingParams
from herd.cli import main
from herd.hub.default import default_model_path

RUTH = os.path.join(os.path.dirname(__file__), "data", "ruth_kjv.txt")  # held out from training (KJV, public domain)


def perplexity(llm, ids, window=256):
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            break
        out = llm.generate({"prompt_token_ids": chunk}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        for tok, d in zip(chunk[1:], out.prompt_logprobs[1:]):
            nll -= d[tok].logprob
            count += 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def inc_config(tmp_path_factory):
    """Static INC scales for the default model, measured on other (training-set) verses."""
    tmp = tmp_path_factory.mktemp("inc")
    rows = [{"system_prompt": "", "question": q} for q in
            ["And God said, Let there be light: and there was light.", "The LORD is my shepherd; I shall not want.",
             "Blessed are the meek: for they shall inherit the earth.", "In the beginning was the Word.",
             "And Moses went up unto God, and the LORD called unto him out of the mountain."]]
    (tmp / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["calibrate", "-m", default_model_path(), "-d", str(tmp / "calib.jsonl"), "-o", str(tmp),
                 "-b", "5", "--max-model-len", "256", "--dtype", "float32"]) == 0
    return str(tmp / "default" / "maxabs_quant_cuda.json")


def test_fp8_modes_keep_default_model_perplexity_within_one_percent(inc_config, tmp_path):
    kw = dict(dtype="float32", max_model_len=320, num_kv_blocks=24, block_size=16, enable_prefix_caching=False)
    base_llm = LLM(**kw)
    ids = base_llm.get_tokenizer().encode(open(RUTH).read())[:1025]
    base = perplexity(base_llm, ids)
    assert 5 < base < 200  # a trained model on held-out English
    export = str(tmp_path / "ct")
    assert main(["quantize", "-m", default_model_path(), "-o", export, "--no-report"]) == 0
    modes = {"fp8": dict(quantization="fp8"), "compressed-tensors": dict(model=export),
             "inc": dict(quantization="inc", quant_config_path=inc_config),
             "inc+fp8_inc kv": dict(quantization="inc", quant_config_path=inc_config, kv_cache_dtype="fp8_inc"),
             "fp8 kv": dict(kv_cache_dtype="fp8")}
    for name, extra in modes.items():
        ppl = perplexity(LLM(**{**kw, **extra}), ids)
        assert abs(ppl / base - 1) < 0.01, f"{name}: perplexity {ppl:.3f} vs {base:.3f}"


def test_fp8_within_one_percent_on_tiny_checkpoints(scout_dir, maverick_dir):
    kw = dict(dtype="float32", max_model_len=160, num_kv_blocks=40, block_size=8, enable_prefix_caching=False)
    ids = list(torch.randint(3, 320, (257,), generator=torch.Generator().manual_seed(0)).tolist())
    for path in (scout_dir, maverick_dir):
        base = perplexity(LLM(path, **kw), ids, window=128)
        ppl = perplexity(LLM(path, quantization="fp8", **kw), ids, window=128)
        assert abs(ppl / base - 1) < 0.01


def test_quantize_prints_and_saves_an_accuracy_report(scout_dir, tmp_path, capsys):
    out = str(tmp_path / "fp8")
    assert main(["quantize", "-m", scout_dir, "-o", out]) == 0
    printed = capsys.readouterr().out
    assert "accuracy report" in printed and "recovery" in printed
    report = json.load(open(os.path.join(out, "quantization_report.json")))
    assert len(report["layer_rel_error"]) == 4
    assert all(0 < e < 0.2 for e in report["layer_rel_error"])  # FP8 noise: nonzero, small
    assert report["num_tokens"] > 10 and 90 < report["recovery_percent"] < 110
