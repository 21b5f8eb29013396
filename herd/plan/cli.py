"""`herd plan`: will this model fit, on how many cards, with how much KV cache, how fast at best."""
from __future__ import annotations

import argparse
import json
import sys

from herd.engine.arg_utils import parse_length, parse_max_model_len
from herd.plan.hardware import catalog, device_names, get_device
from herd.plan.memory import KV_CACHE_DTYPES, PlanSettings
from herd.plan.models import load_model_spec
from herd.plan.planner import make_plan
from herd.plan.report import format_text, table, to_dict

_DEFAULTS = PlanSettings()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="scout | maverick | a checkpoint folder | a config.json path")
    p.add_argument("--device", help=f"accelerator: {' | '.join(device_names())}")
    p.add_argument("--tp", "--tensor-parallel-size", "--tensor_parallel_size", dest="tp", type=int,
                   help="tensor-parallel size (default: the smallest that fits on one node)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "bfloat16", "fp8", "int4"],
                   help="weight precision (auto: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", "--kv_cache_dtype", dest="kv_cache_dtype",
                   default=_DEFAULTS.kv_cache_dtype, choices=list(KV_CACHE_DTYPES))
    p.add_argument("--max-model-len", "--max_model_len", dest="max_model_len", type=parse_max_model_len,
                   help="tokens per sequence: 4096, 8k, 32K, 1M (default, or auto: min(max_position_embeddings, 8192))")
    p.add_argument("--gpu-memory-utilization", "--gpu_memory_utilization", dest="gpu_memory_utilization",
                   type=float, default=_DEFAULTS.gpu_memory_utilization)
    p.add_argument("--max-num-seqs", "--max_num_seqs", dest="max_num_seqs", type=int,
                   default=_DEFAULTS.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", "--max_num_batched_tokens", dest="max_num_batched_tokens",
                   type=parse_length, default=_DEFAULTS.max_num_batched_tokens,
                   help="tokens per scheduler step; sizes the activation workspace and prefill chunks")
    p.add_argument("--batch-size", type=int,
                   help="decode batch for the roofline (default: as many sequences as fit)")
    p.add_argument("--context-len", type=parse_length,
                   help="tokens of context per sequence for the roofline (default: max_model_len)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--list-devices", action="store_true", help="print the device catalog and exit")


def _list_devices(as_json: bool) -> int:
    devices = catalog()
    if as_json:
        print(json.dumps([d.__dict__ for d in devices], indent=2))
        return 0
    rows = [[d.key, d.name, f"{d.memory_gib:g} GiB {d.memory_type}", f"{d.bandwidth_tbps:g}",
             f"{d.bf16_tflops:g}", f"{d.fp8_tflops:g}" if d.fp8_tflops else "-",
             f"{d.fp8_format} ({d.fp8_max:g})" if d.fp8_format else "-"] for d in devices]
    print("\n".join(table(["device", "name", "memory", "TB/s", "bf16 TFLOP/s", "fp8 TFLOP/s", "fp8 format"],
                          rows, indent="", left=3)))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list_devices:
        return _list_devices(args.json)
    try:
        if not args.model or not args.device:
            raise ValueError("--model and --device are required (see --list-devices for devices)")
        model = load_model_spec(args.model)
        device = get_device(args.device)
        dtype = {"auto": model.checkpoint_dtype, "bfloat16": "bf16"}.get(args.dtype, args.dtype)
        settings = PlanSettings(
            dtype=dtype, kv_cache_dtype=args.kv_cache_dtype,
            max_model_len=(min(model.text.max_position_embeddings, 8192) if args.max_model_len in (None, "auto")
                           else args.max_model_len),
            gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens)
        result = make_plan(model, device, settings, tp=args.tp, batch_size=args.batch_size,
                           context_len=args.context_len)
    except (ValueError, FileNotFoundError) as e:
        print(f"herd plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(to_dict(result), indent=2) if args.json else format_text(result))
    return 0
