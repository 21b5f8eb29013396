"""`herd calibrate`: INC-compatible FP8 calibration, the flow of vLLM-HPU's calibrate_model.sh.

  1. prompts: a local dataset (.pkl DataFrame / .jsonl / .parquet with `system_prompt` and
     `question`), optionally shuffled (seed 42) and cut to -l rows, formatted with the chat template
  2. QUANT_CONFIGs: <OUT>/<model>/maxabs_measure_<dev>.json and maxabs_quant_<dev>.json, both with
     dump_stats_path = <OUT>/<model>/<dev>/inc_output
  3. measure: run the model over the prompts in MEASURE mode (per-rank maxabs files)
  4. post-process (step 3), expert coverage report, optional unification to -r ranks
Serve afterwards with QUANT_CONFIG=<OUT>/<model>/maxabs_quant_<dev>.json.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from herd.engine.arg_utils import parse_length
from herd.quant.formats import ScaleDevice
from herd.quant.recovery import (add_bf16_arguments, add_gptq_inputs_argument, add_to_blocklist, gptq_for_inc,
                                 keep_bf16_for_inc)
from herd.quant.inc.config import IncQuantConfig
from herd.quant.inc.scale_methods import PRESETS, ScaleMethod, ScaleMethodTable
from herd.quant.inc.nodes import UNMEASURED_ATTENTION_OPS, find_measurement_sets
from herd.quant.inc.unify import (coverage_report, format_coverage, load_rank_set, postprocess, unify_files,
                                  write_coverage_report)

REQUIRED_FIELDS = ("system_prompt", "question")
SHUFFLE_SEED = 42


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("example:\n  herd calibrate -m /models/Llama-4-Scout-17B-16E-Instruct "
                     "-d open_orca_gpt4_tokenized_llama.calibration_1000.pkl -o ./calib -l 512 -t 8\n"
                     "then serve with QUANT_CONFIG=./calib/llama-4-scout-17b-16e-instruct/maxabs_quant_cuda.json")
    parser.add_argument("-m", "--model", required=True,
                        help="path to the model folder (HF checkpoint); its last path component, lower-cased, "
                             "names the output subfolder")
    parser.add_argument("-d", "--dataset", required=True,
                        help="calibration dataset: a local .pkl (pandas DataFrame, e.g. MLCommons "
                             "open_orca_gpt4_tokenized_llama.calibration_1000.pkl), .jsonl or .parquet file "
                             "with `system_prompt` and `question` columns")
    parser.add_argument("-o", "--output-dir", required=True,
                        help="output directory; configs and measurements go to <OUT>/<model_name>/")
    parser.add_argument("-b", "--batch-size", type=int, default=32,
                        help="prompts per generate() call while measuring (default: 32)")
    parser.add_argument("-l", "--limit", type=int, default=None,
                        help="use only this many samples, drawn after a shuffle with seed 42 (default: all)")
    parser.add_argument("-t", "--tensor-parallel-size", type=int, default=1,
                        help="tensor parallel size to measure with (default: 1)")
    parser.add_argument("-r", "--target-ranks", type=int, default=None,
                        help="also unify the measurements to this many ranks (fewer or more than -t)")
    parser.add_argument("-u", "--expert-parallel", action="store_true",
                        help="measurements come from an expert-parallel run: unify by concatenating "
                             "each rank's experts instead of taking the max")
    parser.add_argument("-g", "--card-groups", metavar="GROUPS",
                        help="calibrate_model.sh's -g: unify groups of adjacent ranks, e.g. 0,1--2,3 for -t 4 "
                             "(the same as -r 2)")
    parser.add_argument("-e", "--enforce-eager", action="store_true",
                        help="calibrate_model.sh's -e: measure without CUDA graphs or compiled decode")
    parser.add_argument("--max-model-len", type=parse_length, default=2048,
                        help="context length while measuring; longer prompts are truncated (default 2048)")
    parser.add_argument("--dtype", default="auto", help="model dtype while measuring (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "g2", "g3"],
                        help="accelerator the scales are for: cuda (E4M3FN, any float scale), g2 (Gaudi2, "
                             "range 240) or g3 (Gaudi3); names the config files (default: cuda)")
    add_bf16_arguments(parser)
    parser.add_argument("--blocklist-names", nargs="+", default=[], metavar="REGEX",
                        help="node-name regexes added to the QUANTIZE config's blocklist (left in bf16), e.g. "
                             "'self_attn\\.(qkv|o)_proj$' for the compressed-tensors recipe's bf16 attention")
    parser.add_argument("--rounding", choices=("nearest", "gptq"), default="nearest",
                        help="gptq: round the weights onto INC's per-channel power-of-two FP8 grid with GPTQ error "
                             "feedback from the calibration prompts, in a bf16 copy <OUT>/<model>/gptq-bf16 that "
                             "is measured and served (needs a *_weights_pcs_maxabs_pow2 --scale-method)")
    add_gptq_inputs_argument(parser, "quantized", "it compensates part of what static input scales cost",
                             choices=("original", "quantized", "asymmetric"))
    static = [m.value for m in ScaleMethod if not PRESETS[m].dynamic]
    parser.add_argument("--scale-method", default="maxabs_hw", type=str.lower, choices=static, metavar="METHOD",
                        help="scale_method written into the QUANTIZE config (default: maxabs_hw); one of "
                             + ", ".join(static))


# ---- dataset ------------------------------------------------------------------------------------
def load_dataset(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} (herd reads local .pkl, .jsonl or .parquet "
                                "files; it does not download datasets)")
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        rows = _rows_from_object(_read_pickle(path), path)
    elif suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported dataset format {suffix!r}; use .pkl, .jsonl or .parquet")
    return validate_rows(rows, path)


def _read_pickle(path: Path):
    warnings.warn(f"loading {path} with pickle: unpickling can run arbitrary code, use only files you trust",
                  stacklevel=3)
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "pandas":
            raise RuntimeError(f"{path} holds a pandas DataFrame but pandas is not installed; "
                               "`pip install 'herd[calibrate]'` (or pandas), or convert the file to JSON "
                               "Lines") from None
        raise


def _rows_from_object(obj, path: Path) -> list[dict]:
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):   # pandas DataFrame
        return obj.to_dict("records")
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        return obj
    if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):
        n = {len(v) for v in obj.values()}
        if len(n) != 1:
            raise ValueError(f"{path}: columns have different lengths {sorted(n)}")
        return [dict(zip(obj, vals)) for vals in zip(*obj.values())]
    raise ValueError(f"{path}: expected a DataFrame, a list of records or a dict of columns, "
                     f"got {type(obj).__name__}")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(f"reading {path} needs pyarrow, which is not installed; `pip install pyarrow`, "
                           "or convert the file to JSON Lines") from None
    return pq.read_table(path).to_pylist()


def validate_rows(rows: list, path: Path | str = "dataset") -> list[dict]:
    if not rows:
        raise ValueError(f"{path}: the dataset is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is not a record")
        for key in REQUIRED_FIELDS:
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path}: row {i} needs a string {key!r} field "
                                 f"(columns: {sorted(row)})")
    return rows


def select_samples(rows: list[dict], limit: int | None, seed: int = SHUFFLE_SEED) -> list[dict]:
    """Shuffle with seed 42 and keep `limit` rows. numpy's RandomState(42).permutation is what pandas'
    df.sample(frac=1, random_state=42) draws, so the same rows are picked as by calibrate_model.sh."""
    if limit is None:
        return list(rows)
    if limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    order = np.random.RandomState(seed).permutation(len(rows))[:limit]
    return [rows[i] for i in order]


# ---- prompts ------------------------------------------------------------------------------------
def conversation(row: dict, model_name: str = "") -> list[dict]:
    if "mixtral" in model_name.lower():  # Mixtral's template rejects a system role
        return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["system_prompt"]}]
    return [{"role": "system", "content": row["system_prompt"]}, {"role": "user", "content": row["question"]}]


def format_prompt(row: dict, tokenizer=None, model_name: str = "") -> str:
    """Chat-template text; `{system_prompt}. {question}` when there is no template (ValueError)."""
    if tokenizer is not None:
        try:
            return tokenizer.apply_chat_template(conversation(row, model_name), tokenize=False)
        except ValueError:
            pass
    return f"{row['system_prompt']}. {row['question']}"


def format_prompts(rows: list[dict], tokenizer=None, model_name: str = "") -> list[str]:
    return [format_prompt(r, tokenizer, model_name) for r in tqdm(rows, desc="prompts", disable=len(rows) < 100)]


def load_tokenizer(model_path: str):
    if not Path(model_path).is_dir():
        raise RuntimeError(f"model folder not found: {model_path} (herd calibrates local checkpoints)")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot load the tokenizer from {model_path}: {e}") from None


# ---- configs ------------------------------------------------------------------------------------
def model_name_of(model_path: str) -> str:
    return Path(str(model_path).rstrip("/")).name.lower()


# vLLM-HPU attention ops herd does not measure (see herd.quant.inc.nodes.ATTENTION_OPS): blocked,
# so INC leaves them in bf16 instead of failing on a module without measurements.
BLOCKLIST = {"types": [], "names": list(UNMEASURED_ATTENTION_OPS)}


def write_quant_configs(model_root: Path, device: str, scale_method: str = "maxabs_hw") -> tuple[Path, Path, Path]:
    """Write maxabs_measure_<dev>.json and maxabs_quant_<dev>.json (the configs calibrate_model.sh
    generates, plus the blocklist of the attention ops herd does not measure); returns
    (measure config, quant config, dump_stats_path prefix). Every key and value is one INC's
    Fp8cfg.parse accepts: the CUDA configs differ from the Gaudi ones only in their file names (herd
    computes CUDA scales for any config it runs; INC on Gaudi computes its device's scales)."""
    dev = ScaleDevice.parse(device)
    prefix = (model_root / dev.tag / "inc_output").resolve()
    empty = {"types": [], "names": []}
    measure = {"method": "HOOKS", "mode": "MEASURE", "observer": "maxabs", "allowlist": empty,
               "blocklist": BLOCKLIST, "quantize_weight": False, "dump_stats_path": str(prefix)}
    quant = {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": scale_method, "allowlist": empty,
             "blocklist": BLOCKLIST, "dump_stats_path": str(prefix)}
    model_root.mkdir(parents=True, exist_ok=True)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = model_root / f"maxabs_measure_{dev.tag}.json", model_root / f"maxabs_quant_{dev.tag}.json"
    for path, cfg in zip(paths, (measure, quant)):
        path.write_text(json.dumps(cfg, indent=4) + "\n")
        IncQuantConfig.from_json_file(path)  # what we write must parse
    return paths[0], paths[1], prefix


# ---- the engine seam ----------------------------------------------------------------------------
def card_groups_to_ranks(groups: str, world: int) -> int:
    """-g `0,1--2,3`: target rank i is the max over group i. herd unifies adjacent ranks (TP shards
    are contiguous), so the groups must be equal runs of adjacent ranks in order covering 0..world-1;
    the result is the number of groups."""
    try:
        parsed = [[int(r) for r in g.split(",")] for g in groups.split("--")]
    except ValueError:
        raise ValueError(f"-g {groups!r}: expected card indices separated by commas, groups by '--' "
                         "(e.g. 0,1--2,3)") from None
    size = len(parsed[0])
    expected = [list(range(i * size, (i + 1) * size)) for i in range(len(parsed))]
    if parsed != expected or len(parsed) * size != world:
        raise ValueError(f"-g {groups!r}: herd unifies equal groups of adjacent ranks in order covering all "
                         f"{world} measured ranks (e.g. {'--'.join(','.join(map(str, g)) for g in expected[:2])}"
                         f"{'--...' if len(expected) > 2 else ''}); use -r for other target sizes")
    return len(parsed)


def measure(model_path: str, prompts: list[str], measure_config: Path, batch_size: int, tp: int,
            max_model_len: int = 2048, dtype: str = "auto", max_tokens: int = 16,
            enforce_eager: bool = False) -> None:
    """Run the model over `prompts` in MEASURE mode with `tp` ranks, `batch_size` prompts per step
    (INC's step 2: default sampling, 16 new tokens); each rank writes its measurement files at
    shutdown."""
    from tqdm import tqdm

    from herd.engine.llm import LLM

    llm = LLM(model_path, quantization="inc", quant_config_path=str(measure_config), dtype=dtype,
              tensor_parallel_size=tp, max_num_seqs=batch_size, max_model_len=max_model_len,
              enforce_eager=enforce_eager)
    try:
        tok = llm.get_tokenizer()
        params = llm.get_default_sampling_params()
        params.max_tokens = max_tokens
        limit = llm.llm_engine.max_model_len - max_tokens
        # the prompts already carry the template's BOS: encode without adding another
        ids = [{"prompt_token_ids": tok.encode(p, add_special_tokens=False)[:limit]} for p in prompts]
        for start in tqdm(range(0, len(ids), batch_size), desc="calibration", unit="batch"):
            llm.generate(ids[start:start + batch_size], params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()


def after_measure(prefix: Path, world: int, target_ranks: int | None, expert_parallel: bool) -> dict:
    """Step 3 post-processing, coverage report, optional unification; returns the coverage report."""
    sets = find_measurement_sets(prefix)
    if world not in sets:
        raise FileNotFoundError(f"the measure step wrote no files for {world} rank(s) under {prefix} "
                                f"(found world sizes {sorted(sets)})")
    ranks = load_rank_set(prefix, world)
    for rank, meas in enumerate(ranks):
        if postprocess(meas):
            stem = str(sets[world][rank].with_suffix(""))
            meas.save(stem, with_mod_list=False)
    report = coverage_report(ranks, expert_parallel)
    write_coverage_report(report, Path(f"{prefix}_coverage.json"))
    print(format_coverage(report))
    if target_ranks is not None and target_ranks != world:
        unify_files(prefix, target_ranks, source_world=world, expert_parallel=expert_parallel)
        print(f"unified {world} -> {target_ranks} rank(s): {prefix}_hooks_maxabs_<i>_{target_ranks}.npz")
    return report


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--batch-size", args.batch_size), ("--tensor-parallel-size", args.tensor_parallel_size),
                        ("--target-ranks", args.target_ranks or 1)):
        if value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = select_samples(load_dataset(args.dataset), args.limit)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in caught:  # pickle / pandas warnings: one line each, not Python's two-line format
        print(f"warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    if getattr(args, "card_groups", None):
        try:
            ranks = card_groups_to_ranks(args.card_groups, args.tensor_parallel_size)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.target_ranks not in (None, ranks):
            print(f"error: -g makes {ranks} rank(s) but -r says {args.target_ranks}", file=sys.stderr)
            return 2
        args.target_ranks = ranks
    model_name = model_name_of(args.model)
    model_root = Path(args.output_dir) / model_name
    try:
        tokenizer = load_tokenizer(args.model)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = format_prompts(rows, tokenizer, model_name)
    measure_cfg, quant_cfg, prefix = write_quant_configs(model_root, args.device, args.scale_method)
    if args.blocklist_names:
        add_to_blocklist(str(quant_cfg), args.blocklist_names)
    with open(model_root / "calibration_prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"input": p}) + "\n")
    print(f"{len(prompts)} prompts; measure config {measure_cfg}; quant config {quant_cfg}")
    try:
        # the bf16 layers are chosen on the original weights, before any rounding
        method = ScaleMethodTable.from_name(args.scale_method).default
        kept = keep_bf16_for_inc(args.model, prompts, str(quant_cfg), args.bf16_layers,
                                 "pcs" in args.scale_method, blocklist=args.blocklist_names,
                                 activations="dynamic" if method.dynamic else "static",
                                 input_backoff=method.activation.backoff)
        if kept.format():
            print(kept.format())
        if args.rounding == "gptq":
            args.model = gptq_for_inc(args.model, prompts, str(model_root / "gptq-bf16"), args.scale_method,
                                      args.device, skip=args.blocklist_names, keep=kept.kept_modules(),
                                      input_backoff=method.activation.backoff,
                                      sequential=args.gptq_inputs == "quantized",
                                      asymmetric=args.gptq_inputs == "asymmetric")
        eager = {"enforce_eager": True} if getattr(args, "enforce_eager", False) else {}
        measure(args.model, prompts, measure_cfg, args.batch_size, args.tensor_parallel_size,
                args.max_model_len, args.dtype, **eager)
        after_measure(prefix, args.tensor_parallel_size, args.target_ranks, args.expert_parallel)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: calibration failed: {e}", file=sys.stderr)
        return 1
    ranks = args.target_ranks or args.tensor_parallel_size
    print(f"serve with:\n  QUANT_CONFIG={quant_cfg} herd serve {args.model} --quantization inc "
          f"--kv-cache-dtype fp8_inc --tensor-parallel-size {ranks}")
    return 0
