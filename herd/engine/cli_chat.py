"""`herd chat [MODEL]`: an interactive conversation in the terminal, streamed token by token."""
from __future__ import annotations

import itertools
import sys

from herd.engine.arg_utils import add_engine_args, add_model_arg, engine_kwargs, resolve_model
from herd.engine.cli_generate import add_sampling_args, sampling_params, stream


def add_arguments(parser):
    add_model_arg(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(parser)
    add_engine_args(parser)


def run(args) -> int:
    from herd.config import EngineConfig
    from herd.hub.default import default_model_path
    from herd.engine.llm_engine import LLMEngine
    from herd.engine.tokenizer import apply_chat_template

    engine = LLMEngine(EngineConfig.from_kwargs(resolve_model(args) or default_model_path(), **engine_kwargs(args)))
    params = sampling_params(engine, args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("herd chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.")
    for turn in itertools.count():
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = apply_chat_template(engine.tokenizer, messages)
        room = engine.max_model_len - len(ids) - 1
        if room <= 0:
            print("(the conversation is longer than the context; use /reset)", file=sys.stderr)
            messages.pop()
            continue
        params.max_tokens = min(args.max_tokens, room)
        reply = stream(engine, f"chat-{turn}", {"prompt_token_ids": ids}, params)
        messages.append({"role": "assistant", "content": reply})
    return 0
