"""`herd generate [MODEL] PROMPT`: one completion, printed as it is produced.

Also what `herd chat` shares with it: the sampling flags, loading the engine while saying on stderr
what is happening (GGUF conversion and weight loading log their steps; a banner names the model,
its size and the device once it is ready), and streaming that stops cleanly on Ctrl-C.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from herd.engine.arg_utils import add_engine_args, add_model_arg, engine_kwargs, resolve_model

# Exceptions that are the user's input (a wrong path, flag or prompt): one line, no traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotImplementedError, ImportError)
_LOADING_LOGGERS = ("herd.gguf", "herd.model.loader")  # their INFO lines are the loading status


def add_sampling_args(parser, max_tokens: int = 64):
    parser.add_argument("--max-tokens", "--max_tokens", type=int, default=max_tokens,
                        help="most tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: the model's generation_config.json, else 1.0 (0: greedy)")
    parser.add_argument("--top-p", "--top_p", type=float, default=None,
                        help="default: the model's generation_config.json, else 1.0 (off)")
    parser.add_argument("--top-k", "--top_k", type=int, default=None,
                        help="default: the model's generation_config.json, else off")


def sampling_params(engine, args):
    params = engine.default_sampling_params()
    params.max_tokens = args.max_tokens
    for name in ("temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    params._verify_args()
    return params


def add_arguments(parser):
    add_model_arg(parser)
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt (quote it)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_sampling_args(parser)
    add_engine_args(parser)


class StopOnCtrlC:
    """Inside `with`, Ctrl-C (SIGINT) only sets `pressed`: the engine step that is running completes
    and the caller stops between steps, so the engine stays usable. Outside, Ctrl-C raises
    KeyboardInterrupt as usual. Calling the object answers whether Ctrl-C was pressed."""

    def __init__(self):
        self.pressed = False
        self._previous = None

    def __enter__(self):
        self.pressed = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._press)
        return self

    def _press(self, signum, frame):
        self.pressed = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __call__(self) -> bool:
        return self.pressed


def stream(engine, request_id, prompt, params, out=None, stop=None) -> str:
    """Write the completion as it grows; return its text. When `stop()` turns true between steps the
    request is aborted (its KV blocks freed) and the text so far is returned."""
    out = out or sys.stdout
    engine.add_request(request_id, prompt, params)
    printed = 0
    text = ""
    try:
        while engine.has_unfinished_requests():  # this request only: chat and generate run one at a time
            if stop is not None and stop():
                break
            for o in engine.step():
                if o.request_id != request_id:
                    continue
                text = o.outputs[0].text
                out.write(text[printed:])
                out.flush()
                printed = len(text)
    finally:
        engine.abort_request(request_id)  # a no-op once the request finished
    out.write("\n")
    out.flush()
    return text


class _StatusHandler(logging.Handler):
    """herd log records on stderr: INFO lines as they are, warnings and errors with their level."""

    def emit(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        print(msg, file=sys.stderr, flush=True)


def show_loading_status():
    """Let GGUF conversion and weight loading say what they do (their INFO lines) on stderr; other
    herd modules still show only warnings."""
    root = logging.getLogger("herd")
    if not any(isinstance(h, _StatusHandler) for h in root.handlers):
        root.addHandler(_StatusHandler(logging.INFO))
    for name in _LOADING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def describe_model(typed: str | None) -> tuple[str, str]:
    """(label, description) for banners: an alias and its title, or a file or folder's name and path."""
    from herd.hub.aliases import ALIASES, DEFAULT_ALIAS

    if typed is None:
        return f"{DEFAULT_ALIAS} (the default model)", ALIASES[DEFAULT_ALIAS].title
    if typed in ALIASES and not os.path.exists(typed):
        return typed, ALIASES[typed].title
    return os.path.basename(os.path.normpath(typed)), os.path.abspath(typed)


def count_parameters(path: str) -> int:
    """Parameters of a checkpoint folder from its safetensors headers (quantization scales left out)."""
    from herd.model.loader import checkpoint_shapes

    total = 0
    for name, shape in checkpoint_shapes(path).items():
        if not name.endswith(("_scale", "zero_point")):
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def human_count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def load_engine(args, command: str):
    """The LLMEngine for MODEL (default: the embedded tiny Llama 4). Says on stderr what it loads
    before the slow part starts; returns (engine, banner), the banner naming the model, its size, the
    dtype, the device and the context length."""
    typed = args.model_tag or args.model
    path = resolve_model(args)
    label, description = describe_model(typed)
    print(f"herd {command}: loading {label} ...", file=sys.stderr, flush=True)
    show_loading_status()
    start = time.monotonic()

    import torch

    from herd.config import EngineConfig
    from herd.engine.llm_engine import LLMEngine
    from herd.hub.default import default_model_path

    engine = LLMEngine(EngineConfig.from_kwargs(path or default_model_path(), **engine_kwargs(args)))
    cfg = engine.config
    device = cfg.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    dtype = str(cfg.model.torch_dtype).removeprefix("torch.")
    banner = (f"herd {command}: {label}: {description}\n"
              f"  {human_count(count_parameters(cfg.model.model))} parameters, {dtype} on {device}, "
              f"context {engine.max_model_len} tokens, loaded in {time.monotonic() - start:.1f} s")
    return engine, banner


def load_engine_or_status(args, command: str):
    """load_engine with the commands' error handling: (engine, banner), or the exit status after a
    one-line message (2 for a user error, 130 for Ctrl-C while loading)."""
    try:
        return load_engine(args, command)
    except KeyboardInterrupt:
        print(f"herd {command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"herd {command}: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from herd.engine.tokenizer import apply_chat_template

    loaded = load_engine_or_status(args, "generate")
    if isinstance(loaded, int):
        return loaded
    engine, banner = loaded
    print(banner, file=sys.stderr, flush=True)
    try:
        params = sampling_params(engine, args)
        prompt = args.prompt
        if args.chat:
            ids = apply_chat_template(engine.tokenizer, [{"role": "user", "content": prompt}])
            prompt = {"prompt_token_ids": ids}
        with StopOnCtrlC() as ctrl_c:
            stream(engine, "generate-0", prompt, params, stop=ctrl_c)
        return 130 if ctrl_c.pressed else 0
    except USER_ERRORS as e:
        print(f"herd generate: error: {e}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
