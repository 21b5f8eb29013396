"""`herd eval [MODEL] --text FILE | --dataset FILE.jsonl [--compare CONFIG ...]`: perplexity and FP8 recovery.

With --compare, each configuration is loaded in turn in this process (the previous engine is freed
first) and scored on the same token ids; the first one is the baseline of the recovery column.
"""
from __future__ import annotations

import json
import sys

from herd.engine.arg_utils import add_engine_args, add_model_arg, engine_kwargs, resolve_model


def add_arguments(parser):
    add_model_arg(parser)
    src = parser.add_argument_group("text")
    src.add_argument("--text", default=None, help="plain text file to score")
    src.add_argument("--dataset", default=None,
                     help="local .jsonl (one object per line) or .json list; documents joined by a blank line")
    src.add_argument("--text-field", "--text_field", dest="text_field", default="text",
                     help="field holding the text in --dataset rows (default: text)")
    src.add_argument("--max-eval-tokens", "--max_eval_tokens", dest="max_eval_tokens", type=int, default=None,
                     help="score only the first N tokens of the text")
    w = parser.add_argument_group("windows")
    w.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: the window, i.e. no overlap)")
    w.add_argument("--compare", nargs="+", default=None, metavar="CONFIG",
                   help="configurations to compare, the first is the baseline: shorthands "
                        "(bf16 fp16 fp32 fp8 inc compressed-tensors kv-fp8 kv-fp8-inc), key=value engine options "
                        "joined by commas (e.g. inc,quant_config_path=q.json), or a checkpoint folder")
    parser.add_argument("--output-json", "--output_json", dest="output_json", default=None)
    add_engine_args(parser)


def read_text(args) -> str:
    if bool(args.text) == bool(args.dataset):
        raise ValueError("give exactly one of --text FILE or --dataset FILE")
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            return f.read()
    with open(args.dataset, encoding="utf-8") as f:
        if args.dataset.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = json.load(f)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{args.dataset}: expected a non-empty list of rows")
    missing = [i for i, r in enumerate(rows) if not isinstance(r, dict) or args.text_field not in r]
    if missing:
        raise ValueError(f"{args.dataset}: row {missing[0]} has no {args.text_field!r} field (see --text-field)")
    return "\n\n".join(str(r[args.text_field]) for r in rows)


def evaluate(model: str, text: str, configs: list[tuple[str, dict]], base_kwargs: dict,
             stride: int | None = None, max_eval_tokens: int | None = None, use_tqdm: bool = True):
    """Score `text` under each (label, overrides) in turn; returns (results, {label: error})."""
    from herd.bench.perplexity import bos_prefix, default_window, free_engine, perplexity
    from herd.engine.llm import LLM

    base_kwargs = {**base_kwargs, "enable_prefix_caching": False}  # every prompt position must be computed
    results, errors = [], {}
    ids = prefix = vocab = None
    for label, over in configs:
        over = dict(over)
        path = over.pop("model", model)
        kwargs = {**base_kwargs, **over}
        try:
            llm = LLM(path, **kwargs)
        except (ValueError, TypeError, OSError, NotImplementedError, ImportError, RuntimeError) as e:
            errors[label] = f"{type(e).__name__}: {e}"
            continue
        try:
            if ids is None:  # the first loaded configuration's tokenizer defines the token ids
                tok = llm.get_tokenizer()
                ids = tok.encode(text, add_special_tokens=False)[:max_eval_tokens]
                prefix, vocab = bos_prefix(tok), llm.config.model.hf_config.vocab_size
            elif llm.config.model.hf_config.vocab_size != vocab:
                raise ValueError(f"vocab size {llm.config.model.hf_config.vocab_size} differs from the "
                                 f"baseline's {vocab}; configurations must share a tokenizer")
            window = default_window(llm.config.model.max_model_len, len(prefix))
            r = perplexity(llm, ids, window, stride, prefix, label, use_tqdm)
            r.config = {"model": path, **{k: v for k, v in kwargs.items() if k != "enable_prefix_caching"},
                        "window": window, "stride": stride or window}
            results.append(r)
        except (ValueError, RuntimeError) as e:
            errors[label] = f"{type(e).__name__}: {e}"
        finally:
            free_engine(llm)
    return results, errors


def run(args) -> int:
    from herd.bench.perplexity import format_table, parse_config, recovery
    from herd.hub.default import default_model_path

    model = resolve_model(args) or default_model_path()
    try:
        text = read_text(args)
        configs = [parse_config(c) for c in args.compare] if args.compare else [("model", {})]
    except (ValueError, OSError) as e:
        print(f"herd eval: error: {e}", file=sys.stderr)
        return 2
    results, errors = evaluate(model, text, configs, engine_kwargs(args), args.stride, args.max_eval_tokens)
    if args.compare:
        print(format_table(results, errors))
        if results:
            print(f"recovery = PPL({results[0].label}) / PPL(config) x 100; 100% means no loss")
    elif results:
        r = results[0]
        print(f"Perplexity: {r.ppl:.4f} (mean NLL {r.mean_nll:.5f} nats/token over {r.num_tokens} tokens, "
              f"{r.num_windows} windows of up to {r.config['window']} tokens)")
    for label, err in errors.items():
        print(f"herd eval: {label}: {err}", file=sys.stderr)
    if args.output_json:
        out = {"model": model, "results": [dict(r.to_json(), recovery=recovery(results[0], r)) for r in results],
               "errors": errors}
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 1 if errors or not results else 0
