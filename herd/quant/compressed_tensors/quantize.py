"""`herd quantize`: one-shot FP8 export of a HF Llama 4 checkpoint in the compressed-tensors format.

  herd quantize -m Llama-4-Scout-17B-16E-Instruct -o Scout-FP8-dynamic --scheme fp8-dynamic
  herd quantize -m MODEL -o OUT --scheme fp8 --calib-data prompts.jsonl --num-calibration-samples 512
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from herd.quant.compressed_tensors.config import DEFAULT_IGNORE, SCHEME_NAMES
from herd.quant.observers import OBSERVERS
from herd.quant.recovery import add_bf16_arguments, add_gptq_inputs_argument

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 2GiB")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="HF checkpoint folder (bf16 Llama 4)")
    parser.add_argument("-o", "--output", required=True, help="output folder for the FP8 checkpoint")
    parser.add_argument("--scheme", choices=SCHEME_NAMES, default="fp8-dynamic",
                        help="fp8-dynamic: per-channel weights, per-token dynamic activations (no data); "
                             "fp8: per-tensor weights, static activation scales (needs calibration)")
    parser.add_argument("--ignore", nargs="+", metavar="NAME", default=None,
                        help="Linear modules to keep unquantized: exact names or 're:' regexes, replacing the "
                             f"default {' '.join(DEFAULT_IGNORE)}")
    parser.add_argument("--extra-ignore", nargs="+", metavar="NAME", default=[],
                        help="more modules to keep unquantized, added to the ignore list")
    parser.add_argument("--observer", choices=OBSERVERS, default="mse",
                        help="weight scale observer (mse: shrink-factor grid search; minmax: amax/448)")
    parser.add_argument("--rounding", choices=("gptq", "nearest"), default="nearest",
                        help="FP8 weight rounding: nearest (default) or gptq (each column's rounding error spread "
                             "over the others with Hessians from --calib-data; same format and scales)")
    add_gptq_inputs_argument(parser, "original", "quantized measured no better with per-token FP8 inputs")
    add_bf16_arguments(parser)
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", help="output shard size (default 5GB)")
    parser.add_argument("--device", default="cpu", help="device for the observer math (e.g. cuda)")
    calib = parser.add_argument_group("calibration text (static activation scales of --scheme fp8, GPTQ "
                                      "rounding, bf16 layer choice)")
    calib.add_argument("--input-amax", metavar="JSON", help="precomputed {HF module name: max |input|}")
    calib.add_argument("--calib-data", metavar="FILE",
                       help=".txt (one prompt per line) or .jsonl ('text' or 'prompt' field)")
    calib.add_argument("--num-calibration-samples", type=int, default=512)
    calib.add_argument("--max-seq-length", type=int, default=2048)
    calib.add_argument("--save-input-amax", metavar="JSON", help="write the measured amax values here")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    report = parser.add_argument_group("accuracy report (original vs quantized, on the CPU in float32)")
    report.add_argument("--no-report", action="store_true",
                        help="skip the report (for checkpoints that do not fit in CPU memory)")
    report.add_argument("--report-text", metavar="FILE",
                        help="text to measure on, one sample per paragraph (default: a short built-in passage)")


def _input_amax(args) -> dict[str, float] | None:
    if args.scheme != "fp8":
        if args.input_amax:
            print("note: --input-amax is only used by --scheme fp8", file=sys.stderr)
        return None
    if args.input_amax:
        with open(args.input_amax) as f:
            return {str(k): float(v) for k, v in json.load(f).items()}
    if not args.calib_data:
        raise ValueError("--scheme fp8 needs --calib-data FILE (or --input-amax JSON) for static activation scales")
    from herd.quant.compressed_tensors.calib import calibrate_input_amax, load_calibration_sequences

    seqs = load_calibration_sequences(args.calib_data, args.model, args.num_calibration_samples, args.max_seq_length)
    amax = calibrate_input_amax(args.model, seqs, device=args.device, progress=not args.no_progress)
    if args.save_input_amax:
        with open(args.save_input_amax, "w") as f:
            json.dump(amax, f, indent=2, sort_keys=True)
    return amax


def _accuracy_plan(args, ignore: list[str]):
    """GPTQ Hessians and the sensitive layers to keep in bf16 (herd.quant.recovery)."""
    from herd.quant.compressed_tensors.config import fp8_scheme, is_ignored
    from herd.quant.recovery import plan

    seqs, text = None, "the built-in passage"
    if args.calib_data:
        from herd.quant.compressed_tensors.calib import load_calibration_sequences

        seqs = load_calibration_sequences(args.calib_data, args.model, args.num_calibration_samples,
                                          args.max_seq_length)
        text = f"{len(seqs)} samples of {args.calib_data}"
    scheme = fp8_scheme(args.scheme, args.observer)
    return plan(args.model, lambda name: not is_ignored(name, ignore), args.bf16_layers, seqs, text,
                gptq=args.rounding == "gptq", strategy=scheme.weights.strategy, device=args.device,
                progress=not args.no_progress, sequential=args.gptq_inputs == "quantized",
                weight_observer=args.observer, static_inputs=scheme.static_input)


def kept_bf16_reasons(ignored: list[str], ignore: list[str], accuracy) -> dict[str, str]:
    """Why each unquantized Linear stays bf16: a measured sensitivity, or the ignore list's pattern."""
    from herd.quant.compressed_tensors.config import match_name

    measured = accuracy.reasons()
    out = {}
    for name in ignored:
        if name in measured:
            out[name] = measured[name]
        else:
            hits = [p for p in ignore if match_name(name, p)]
            out[name] = f"ignore list ({hits[0]})" if hits else "tied to the input embedding"
    return out


def run(args) -> int:
    from herd.quant.compressed_tensors.writer import quantize_checkpoint

    try:
        ignore = list(DEFAULT_IGNORE if args.ignore is None else args.ignore) + list(args.extra_ignore)
        accuracy = _accuracy_plan(args, ignore)
        ignore += accuracy.kept_modules()
        result = quantize_checkpoint(
            args.model, args.output, scheme=args.scheme, ignore=ignore, observer=args.observer,
            input_amax=_input_amax(args), max_shard_bytes=args.max_shard_size, device=args.device,
            progress=not args.no_progress, hessians=accuracy.hessians,
        )
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"herd quantize: error: {err}", file=sys.stderr)
        return 2
    for pattern in result.unused_ignore_patterns:
        if pattern in DEFAULT_IGNORE:
            continue  # e.g. no vision tower in a text-only checkpoint
        print(f"warning: ignore pattern {pattern!r} matched no Linear module", file=sys.stderr)
    if result.tied_lm_head is not None:
        print(f"note: {result.tied_lm_head} is tied to the input embedding: kept unquantized and listed "
              "in the config's ignore list", file=sys.stderr)
    print(f"wrote {result.output_path}: {len(result.quantized)} Linear modules in FP8 ({args.scheme}), "
          f"{len(result.ignored)} kept unquantized, {len(result.shards)} shard(s)")
    if accuracy.format():
        print(accuracy.format())
    kept_bf16 = kept_bf16_reasons(result.ignored, ignore, accuracy)
    if not args.no_report:
        from herd.quant.accuracy_report import quantization_report

        texts = None
        if args.report_text:
            with open(args.report_text, encoding="utf-8") as f:
                texts = [p.strip() for p in f.read().split("\n\n") if p.strip()][:16]
        try:
            report = quantization_report(args.model, str(result.output_path), texts)
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # the export itself is done
            print(f"warning: accuracy report skipped: {type(err).__name__}: {err}", file=sys.stderr)
            return 0
        report.kept_bf16 = kept_bf16
        print(report.format())
        path = os.path.join(str(result.output_path), "quantization_report.json")
        report.save(path)
        print(f"report saved to {path}")
    return 0
