"""`herd chat [MODEL]`: an interactive conversation in the terminal, streamed token by token.

The conversation stays within the model's context: when the next prompt would leave too little room
for the reply, the oldest turns are dropped (with a notice). Ctrl-C during a reply stops that reply
and keeps the conversation; /reset starts over; /exit or Ctrl-D quits.
"""
from __future__ import annotations

import itertools
import sys

from herd.engine.arg_utils import add_engine_args, add_model_arg
from herd.engine.cli_generate import (USER_ERRORS, StopOnCtrlC, add_sampling_args, load_engine_or_status,
                                      sampling_params, stream)

HELP_LINE = "Type a message and press Enter. Ctrl-C stops a reply, /reset starts over, /exit or Ctrl-D quits."


def add_arguments(parser):
    add_model_arg(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(parser, max_tokens=512)
    add_engine_args(parser)


def fit_conversation(messages: list[dict], encode, max_model_len: int, reply_tokens: int):
    """Drop the oldest turns until the prompt leaves `reply_tokens` of the context for the reply.
    A leading system message and the last message (the new user turn) are never dropped; a user
    message goes together with the assistant reply after it. Returns (kept messages, their prompt
    ids, number of messages dropped); the ids are None when even the last message alone does not fit
    (the prompt must leave at least one token to generate)."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    kept = list(messages)
    dropped = 0
    while True:
        ids = encode(kept)
        if len(ids) + reply_tokens <= max_model_len or len(kept) - head <= 1:
            break
        pair = len(kept) - head > 2 and kept[head]["role"] == "user" and kept[head + 1]["role"] == "assistant"
        n = 2 if pair else 1
        del kept[head:head + n]
        dropped += n
    if len(ids) >= max_model_len:
        return kept, None, dropped
    return kept, ids, dropped


def notice(text: str):
    print(f"({text})", file=sys.stderr, flush=True)


def converse(engine, args, stdin=None, out=None) -> int:
    """The chat loop: read a line, answer it, until /exit or end of input."""
    from herd.engine.tokenizer import apply_chat_template

    stdin, out = stdin or sys.stdin, out or sys.stdout
    params = sampling_params(engine, args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = stdin.isatty()
    limit = engine.max_model_len
    reply_tokens = min(args.max_tokens, limit // 2)  # room kept for a reply when old turns are dropped
    ctrl_c = StopOnCtrlC()
    for turn in itertools.count():
        if interactive:
            out.write("> ")
            out.flush()
        before = list(messages)
        try:
            line = stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            command = line.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                messages = list(system)
                notice("conversation cleared")
                continue
            if not command:
                continue
            wanted = messages + [{"role": "user", "content": line}]
            kept, ids, dropped = fit_conversation(
                wanted, lambda m: apply_chat_template(engine.tokenizer, m), limit, reply_tokens)
            if ids is None:
                notice(f"that message is longer than the model's context of {limit} tokens; it was not sent")
                continue
            if dropped:
                notice(f"dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to stay within "
                       f"the context of {limit} tokens")
            params.max_tokens = min(args.max_tokens, limit - len(ids))
            with ctrl_c:
                reply = stream(engine, f"chat-{turn}", {"prompt_token_ids": ids}, params, out, stop=ctrl_c)
            messages = kept
            if ctrl_c.pressed:
                notice("reply stopped; the conversation goes on")
            if reply or not ctrl_c.pressed:
                messages.append({"role": "assistant", "content": reply})
            else:  # stopped before a word: as if the message had not been sent
                messages = before
        except KeyboardInterrupt:  # Ctrl-C at the prompt (or between replies)
            messages = before
            if interactive:
                out.write("\n")
            notice("Ctrl-D or /exit quits")
    return 0


def run(args) -> int:
    loaded = load_engine_or_status(args, "chat")
    if isinstance(loaded, int):
        return loaded
    engine, banner = loaded
    print(banner, file=sys.stderr)
    if not (args.model_tag or args.model):
        print("  It answers in verses; `herd chat smollm2` (or `make run`) answers questions.", file=sys.stderr)
    print(HELP_LINE, file=sys.stderr, flush=True)
    try:
        return converse(engine, args)
    except USER_ERRORS as e:
        print(f"herd chat: error: {e}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
