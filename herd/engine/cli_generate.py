"""`herd generate [MODEL] PROMPT`: one completion, printed as it is produced."""
from __future__ import annotations

import sys

from herd.engine.arg_utils import add_engine_args, engine_kwargs


def add_sampling_args(parser):
    parser.add_argument("--max-tokens", "--max_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None, help="default: generation_config.json")
    parser.add_argument("--top-p", "--top_p", type=float, default=None)
    parser.add_argument("--top-k", "--top_k", type=int, default=None)


def sampling_params(engine, args):
    params = engine.default_sampling_params()
    params.max_tokens = args.max_tokens
    for name in ("temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    params._verify_args()
    return params


def add_arguments(parser):
    parser.add_argument("args", nargs="+", metavar="[MODEL] PROMPT",
                        help="checkpoint folder (optional; default: the embedded model) and the prompt")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_sampling_args(parser)
    add_engine_args(parser)


def stream(engine, request_id, prompt, params, out=sys.stdout) -> str:
    engine.add_request(request_id, prompt, params)
    printed = 0
    text = ""
    while engine.has_unfinished_requests():
        for o in engine.step():
            text = o.outputs[0].text
            out.write(text[printed:])
            out.flush()
            printed = len(text)
    out.write("\n")
    return text


def run(args) -> int:
    from herd.config import EngineConfig
    from herd.hub.default import default_model_path
    from herd.engine.llm_engine import LLMEngine
    from herd.engine.tokenizer import apply_chat_template

    if len(args.args) > 2:
        print("herd generate: expected [MODEL] PROMPT (quote the prompt)", file=sys.stderr)
        return 2
    model, prompt = (args.args if len(args.args) == 2 else (default_model_path(), args.args[0]))
    engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs(args)))
    params = sampling_params(engine, args)
    if args.chat:
        prompt = {"prompt_token_ids": apply_chat_template(engine.tokenizer, [{"role": "user", "content": prompt}])}
    stream(engine, "generate-0", prompt, params)
    return 0
