"""`herd eval`: perplexity against transformers, --compare recovery, lm-evaluation-harness against herd serve."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from herd import LLM
from herd.bench.perplexity import (PerplexityResult, bos_prefix, make_windows, parse_config, perplexity,
                                   recovery)
from herd.cli import main
from tests.tiny_models import load_hf

TEXT = ("The quick brown fox jumps over the lazy dog while the llamas graze. In the beginning was the word, "
        "and the word was with the herd. Mixture of experts routes each token to one expert and a shared "
        "expert. héllo wörld, naïve café and more text to learn merges from. ") * 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "lm_eval")


def hf_nll(model, ids, windows, prefix):
    """Sum of -log p over the scored tokens of each window, straight from transformers."""
    total, count = 0.0, 0
    for w in windows:
        seq = prefix + ids[w.begin:w.end]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
        for k in range(w.score_from, w.end):
            pos = len(prefix) + k - w.begin  # token position in seq; predicted from pos - 1
            total -= lp[pos - 1, seq[pos]].item()
            count += 1
    return total, count


@pytest.mark.parametrize("stride", [None, 20])
def test_perplexity_matches_transformers(scout_dir, stride):
    llm = LLM(scout_dir, dtype="float32", max_model_len=48, num_kv_blocks=64, block_size=8,
              enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    prefix = bos_prefix(tok)
    assert prefix == [1]
    window = 48 - 1 - len(prefix)
    r = perplexity(llm, ids, window, stride, prefix, use_tqdm=False)
    wins = make_windows(len(ids), window, stride)
    assert r.num_windows == len(wins) > 2 and r.num_tokens == len(ids)
    nll, count = hf_nll(load_hf(scout_dir), ids, wins, prefix)
    assert count == r.num_tokens
    assert r.ppl == pytest.approx(math.exp(nll / count), rel=1e-3)
    assert r.ppl > 1.0


def test_windows_tile_or_slide_and_score_every_token_once():
    tiles = make_windows(100, 30)
    assert [(w.begin, w.end, w.score_from) for w in tiles] == [(0, 30, 0), (30, 60, 30), (60, 90, 60),
                                                                (90, 100, 90)]
    slide = make_windows(100, 30, 10)
    scored = [k for w in slide for k in range(w.score_from, w.end)]
    assert scored == list(range(100))
    assert all(w.end - w.begin <= 30 for w in slide) and slide[1].begin == 10
    # without a BOS the first token has no context, and tiles would leave each window's first token bare
    assert make_windows(100, 30, 10, has_prefix=False)[0].score_from == 1
    with pytest.raises(ValueError, match="overlap"):
        make_windows(100, 30, None, has_prefix=False)
    with pytest.raises(ValueError, match="stride"):
        make_windows(100, 30, 40)


def test_parse_config_and_recovery(scout_dir):
    assert parse_config("fp8") == ("fp8", {"quantization": "fp8"})
    assert parse_config("inc,kv-fp8-inc,quant_config_path=q.json") == (
        "inc,kv-fp8-inc,quant_config_path=q.json",
        {"quantization": "inc", "kv_cache_dtype": "fp8_inc", "quant_config_path": "q.json"})
    assert parse_config("label=ct," + scout_dir) == ("ct", {"model": scout_dir})
    assert parse_config("max-model-len=64")[1] == {"max_model_len": 64}
    with pytest.raises(ValueError, match="neither a shorthand"):
        parse_config("fp9")
    base, worse = PerplexityResult("a", 10, 10 * math.log(4.0), 1), PerplexityResult("b", 10, 10 * math.log(5.0), 1)
    assert recovery(base, worse) == pytest.approx(80.0)


def test_eval_compare_prints_fp8_recovery(scout_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "r.json"
    rc = main(["eval", scout_dir, "--text", str(text), "--compare", "fp32", "fp8", "label=fp8-kv,fp8,kv-fp8",
               "--max-model-len", "64", "--num-kv-blocks", "32", "--block-size", "8", "--output-json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()[:1] in
            (["fp32"], ["fp8"], ["fp8-kv"])}
    assert set(rows) == {"fp32", "fp8", "fp8-kv"}
    assert rows["fp32"][-1] == "100.00%"
    res = {r["label"]: r for r in json.loads(out.read_text())["results"]}
    base, fp8 = res["fp32"], res["fp8"]
    assert base["num_tokens"] == fp8["num_tokens"] == res["fp8-kv"]["num_tokens"] > 100
    assert fp8["config"]["quantization"] == "fp8" and res["fp8-kv"]["config"]["kv_cache_dtype"] == "fp8"
    # FP8 changes the numbers a little: not identical, but close to the fp32 model
    assert fp8["ppl"] != base["ppl"]
    assert fp8["recovery"] == pytest.approx(base["ppl"] / fp8["ppl"] * 100, rel=1e-9)
    assert 90.0 < fp8["recovery"] < 110.0
    assert f"{fp8['recovery']:.2f}%" == rows["fp8"][-1]


def test_eval_reports_a_failing_config(scout_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    rc = main(["eval", scout_dir, "--text", str(text), "--compare", "fp32", "compressed-tensors",
               "--max-model-len", "64", "--num-kv-blocks", "16"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "fp32" in captured.out and "compressed-tensors" in captured.err
    assert main(["eval", scout_dir]) == 2  # no text given


def test_eval_dataset_jsonl(scout_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": s}) for s in TEXT.split(". ")))
    assert main(["eval", scout_dir, "--dataset", str(data), "--text-field", "body", "--max-eval-tokens", "50",
                 "--max-model-len", "64", "--num-kv-blocks", "16"]) == 0
    line = capsys.readouterr().out
    assert "Perplexity:" in line and "over 50 tokens" in line
    assert main(["eval", scout_dir, "--dataset", str(data), "--max-model-len", "64"]) == 2  # no "text" field


# lm_eval's own entry point with the CLI's arguments, minus the ~10 s index of its built-in tasks.
LM_EVAL_SCRIPT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
res = lm_eval.simple_evaluate(model="local-completions", model_args=sys.argv[1], tasks=["herd_tiny_gen", "herd_tiny_mc"],
                              task_manager=TaskManager(include_path=sys.argv[2], include_defaults=False),
                              log_samples=True)
print("RESULTS " + json.dumps({"results": res["results"],
                               "n_mc": len(res["samples"]["herd_tiny_mc"]),
                               "mc_resps": [s["filtered_resps"] for s in res["samples"]["herd_tiny_mc"]]}))
"""


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_lm_eval_local_completions_against_herd_serve(scout_dir, tmp_path):
    """`lm_eval --model local-completions` (docs/eval.md) against a real `herd serve`: a generation task
    and a loglikelihood task (echo + logprobs) from tests/data/lm_eval, nothing downloaded."""
    from tests.server_utils import RemoteServer

    server = RemoteServer(scout_dir, ["--max-model-len", "256", "--num-kv-blocks", "64", "--block-size", "8",
                                      "--dtype", "float32", "--served-model-name", "tiny"])
    try:
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        args = (f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={scout_dir},num_concurrent=2,max_retries=1,max_length=256")
        proc = subprocess.run([sys.executable, "-c", LM_EVAL_SCRIPT, args, DATA], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=240)  # cwd: the YAMLs name data from here
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        server.stop()
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    out = json.loads(line[len("RESULTS "):])
    res = out["results"]
    assert 0.0 <= res["herd_tiny_gen"]["exact_match,none"] <= 1.0
    # The answers are single tokens of the tiny BPE and the distractors split into several, so
    # real summed logprobs pick every answer; zeros or garbage would not.
    assert res["herd_tiny_mc"]["acc,none"] == 1.0
    assert out["n_mc"] == 6
    lls = [float(choice[0]) for doc in out["mc_resps"] for choice in doc]
    assert len(lls) == 18 and all(x < 0 for x in lls) and len(set(lls)) == 18


def test_eval_compare_with_inc_static_scales(scout_dir, tmp_path, capsys):
    """fp32 baseline vs dynamic FP8 vs INC static FP8 (scales measured by `herd calibrate`)."""
    rows = [{"system_prompt": "You are terse.", "question": q} for q in TEXT.split(". ")[:6]]
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["calibrate", "-m", scout_dir, "-d", str(data), "-o", str(tmp_path / "inc"), "-b", "3",
                 "--max-model-len", "128", "--dtype", "float32"]) == 0
    quant_cfg = next((tmp_path / "inc").rglob("maxabs_quant_*.json"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "r.json"
    assert main(["eval", scout_dir, "--text", str(text), "--compare", "fp32", "fp8",
                 f"label=inc,inc,kv-fp8-inc,quant_config_path={quant_cfg}", "--dtype", "float32",
                 "--max-model-len", "64", "--num-kv-blocks", "32", "--block-size", "8", "--output-json", str(out)]) == 0
    capsys.readouterr()
    res = {r["label"]: r for r in json.loads(out.read_text())["results"]}
    assert res["inc"]["config"]["quantization"] == "inc" and res["inc"]["config"]["kv_cache_dtype"] == "fp8_inc"
    assert res["inc"]["ppl"] != res["fp32"]["ppl"]
    assert 80.0 < res["inc"]["recovery"] < 120.0 and 90.0 < res["fp8"]["recovery"] < 110.0
