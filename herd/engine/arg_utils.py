"""Engine arguments: one definition (EngineArgs, vLLM's names and defaults) for `herd serve`,
`generate`, `chat`, `bench`, `eval` and LLM(...). Each field becomes a flag in both spellings
(`--max-model-len` and `--max_model_len`), as vLLM accepts them; LLM(**kwargs) takes the same names.

Fields are of four kinds: engine settings (to EngineConfig), front-end settings (the server's),
vLLM tuning flags that mean nothing here (accepted with a notice), and vLLM features herd does not
have (a one-line error naming the feature when asked for).

This module stays light (no torch): `herd plan` uses parse_length.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, dataclass, field, fields

ENGINE, FRONTEND, NOT_NEEDED_KIND, UNSUPPORTED = "engine", "frontend", "not needed", "not supported"

# vLLM flags that are accepted so existing launch commands work, but change nothing here.
NOT_NEEDED = {
    "use_v2_block_manager": "herd always uses its paged block manager",
    "trust_remote_code": "herd runs no code from the checkpoint",
    "weights_load_device": "herd always loads and quantizes weights on the CPU, then moves them",
    "swap_space": "herd preempts by recomputation and never swaps KV blocks to CPU memory",
    "max_seq_len_to_capture": "herd's captured decode steps serve every context length",
    "disable_custom_all_reduce": "herd uses torch.distributed's all-reduce only",
}

# vLLM features herd does not have: asking for them fails with this message.
UNSUPPORTED_FEATURES = {
    "enable_lora": "LoRA adapters",
    "speculative_config": "speculative decoding",
    "kv_transfer_config": "KV cache transfer between instances (disaggregated prefill)",
    "pipeline_parallel_size": "pipeline parallelism (use --tensor-parallel-size)",
    "cpu_offload_gb": "offloading weights to CPU memory",
}


def not_supported(name: str) -> NotImplementedError:
    return NotImplementedError(f"herd does not support {UNSUPPORTED_FEATURES[name]} "
                               f"(--{name.replace('_', '-')})")


def flag(parser, name: str, *extra: str, **kw):
    """Add --a-b and --a_b (and any short aliases) for one option."""
    dashed = "--" + name.replace("_", "-")
    spellings = [dashed] + ([f"--{name}"] if "_" in name else []) + list(extra)
    kw.setdefault("dest", name)
    parser.add_argument(*spellings, **kw)


def bool_flag(parser, name: str, default, help: str, dest: str | None = None):
    dashed = name.replace("_", "-")
    names = [f"--{dashed}", f"--{name}"] if "_" in name else [f"--{dashed}"]
    parser.add_argument(*names, dest=dest or name, action=argparse.BooleanOptionalAction, default=default, help=help)


_UNITS = {"k": 1000, "K": 1024, "m": 10 ** 6, "M": 1 << 20, "g": 10 ** 9, "G": 1 << 30}


def parse_length(text) -> int:
    """Token counts like vLLM's: 4096, 4k (4000), 4K (4096), 1.5k, 1m, 1M, 1g, 1G."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        text = str(text).strip()
        if text and text[-1] in _UNITS:
            return int(float(text[:-1]) * _UNITS[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid length {text!r} (examples: 4096, 8k, 32K, 1M)") from None


def parse_max_model_len(text) -> int | str:
    """A length, or `auto` / -1: the default (min(the model's context, 8192))."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    n = parse_length(text)
    return "auto" if n == -1 else n


MODEL_HELP = ("checkpoint folder, .gguf file, or a short name: smollm2 (SmolLM2-135M-Instruct) or tiny-llama4 "
              "(default: tiny-llama4, the embedded 5.6M-parameter Llama 4 trained on the King James Bible)")


def add_model_arg(parser):
    parser.add_argument("model_tag", nargs="?", metavar="MODEL", help=MODEL_HELP)
    flag(parser, "model", help="same as MODEL")


def resolve_model(args) -> str | None:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two different models given: {args.model_tag!r} and --model {args.model!r}")
    model = args.model_tag or args.model
    model = resolve_model_alias(args, model)
    return model


def resolve_model_alias(args, model: str | None) -> str | None:
    """A short name (herd.hub.aliases) becomes its path unless a file or folder of that name exists;
    `herd serve` then serves the model under the short name."""
    import os

    from herd.hub.aliases import resolve_alias

    if model is None or os.path.exists(model):
        return model
    path = resolve_alias(model)
    if path is None:
        return model
    if hasattr(args, "served_model_name") and not args.served_model_name:
        args.served_model_name = [model]
    return path


def arg(default=None, help: str = "", *, kind: str = ENGINE, flags: tuple = (), cli: str | None = "",
        **argparse_kw):
    """An EngineArgs field and its flag. `cli`: the flag's name when it differs from the field's
    ("" = the field's name; None = no flag here: the server defines it, or LLM(...) only)."""
    return field(default=default, metadata=dict(help=help, kind=kind, flags=flags, cli=cli, argparse=argparse_kw))


@dataclass
class EngineArgs:
    """Everything that configures an engine, by vLLM's names. Unset (None) values take the
    engine's defaults (herd.config)."""
    model: str | None = arg(None, "checkpoint folder, .gguf file, short name or Hugging Face repo id", cli=None)
    tokenizer: str | None = arg(None, "tokenizer folder or repo id (default: MODEL)")
    revision: str | None = arg(None, "hub revision (branch, tag or commit) of a repo-id MODEL (default: main)")
    tokenizer_revision: str | None = arg(None, "hub revision of a repo-id --tokenizer")
    download_dir: str | None = arg(None, "Hugging Face cache to read repo ids from and download them to "
                                         "(default: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub)")
    dtype: str = arg("auto", "auto | bfloat16 | float16 | float32")
    max_model_len: int | str | None = arg(None, "tokens per sequence: 4096, 8k, 32K, 1M or auto (default: "
                                                "min(config, 8192); above the model's context only with "
                                                "HERD_ALLOW_LONG_MAX_MODEL_LEN=1)", type=parse_max_model_len)
    seed: int = arg(0, "", type=int)
    device: str | None = arg(None, "cuda | cpu (default: cuda when available)")
    block_size: int | None = arg(None, "tokens per KV-cache block (default 128)", type=int)
    gpu_memory_utilization: float | None = arg(None, "fraction of accelerator memory to use (default 0.9)",
                                               type=float)
    num_kv_blocks: int | None = arg(None, "KV-cache blocks per group (skips sizing)",
                                    flags=("--num-gpu-blocks-override", "--num_gpu_blocks_override"), type=int)
    num_gpu_blocks_override: int | None = arg(None, "vLLM's name of num_kv_blocks", cli=None)
    cpu_kv_cache_space_gib: float | None = arg(None, "GiB of KV cache when running on CPU (default 1)",
                                               cli="cpu_kv_cache_space", type=float)
    kv_cache_dtype: str | None = arg(None, "auto | fp8 | fp8_e4m3 | fp8_inc")
    enable_prefix_caching: bool | None = arg(None, "reuse KV blocks of shared prompt prefixes (default on)",
                                             action=argparse.BooleanOptionalAction)
    max_num_seqs: int | None = arg(None, "most sequences per step", type=int)
    max_num_batched_tokens: int | None = arg(None, "token budget per step (8192, 8k)", type=parse_length)
    enable_chunked_prefill: bool | None = arg(None, "split long prompts over steps",
                                              action=argparse.BooleanOptionalAction)
    tensor_parallel_size: int | None = arg(None, "accelerators per model replica", flags=("-tp",), type=int)
    pipeline_parallel_size: int | None = arg(None, "pipeline stages: 1 (herd has no pipeline parallelism)",
                                             kind=UNSUPPORTED, flags=("-pp",), type=int)
    distributed_executor_backend: str | None = arg(None, "", choices=["uni", "mp", "ray"])
    enable_expert_parallel: bool | None = arg(None, "", flags=("-ep",), action="store_true")
    quantization: str | None = arg(None, "inc | fp8 | compressed-tensors (default: from the checkpoint)",
                                   flags=("-q",))
    quant_config_path: str | None = arg(None, "INC QUANT_CONFIG json for --quantization inc (default: "
                                              "$QUANT_CONFIG)", cli="quant_config")
    attention_backend: str | None = arg(None, "auto: triton on CUDA, sdpa on CPU",
                                        choices=["auto", "reference", "sdpa", "triton"])
    enforce_eager: bool | None = arg(None, "no CUDA graphs or compiled decode (default: graphs on CUDA)",
                                     action="store_true")
    async_scheduling: bool = arg(False, "schedule each step while the previous one runs, its sampled tokens "
                                        "fed back on the device (steps that need them on the host run "
                                        "synchronously; see docs/fast_path.md)", action="store_true")
    compilation_config: str | int | dict | None = arg(
        None, "level (-O3) or JSON, e.g. '{\"level\": 3, \"backend\": \"inductor\"}'", flags=("-O",))
    structured_outputs_config: str | dict | None = arg(
        None, "JSON, e.g. '{\"backend\": \"guidance\", \"disable_any_whitespace\": false}' (backends: auto, "
              "guidance)")
    guided_decoding_backend: str | None = arg(None, "older spelling of --structured-outputs-config "
                                                    "'{\"backend\": ...}'", kind=FRONTEND)
    limit_mm_per_prompt: str | dict | None = arg(None, "most items per prompt: image=10 or '{\"image\": 10}' "
                                                       "(more images in a request: 400; default: no limit)")
    generation_config: str = arg("auto", "sampling defaults: auto (the model's generation_config.json), "
                                         "vllm (none), or a folder with a generation_config.json")
    override_generation_config: str | dict | None = arg(
        None, "JSON on top of the generation config, e.g. '{\"temperature\": 0.6}' (Llama 4: "
              "attn_temperature_tuning)")
    cpu_offload_gb: float | None = arg(None, "GiB of weights to keep in CPU memory: 0 (herd does not offload)",
                                       kind=UNSUPPORTED, type=float)
    # Flags the server defines (its own group), LLM(...) keywords here.
    served_model_name: list[str] | None = arg(None, "names clients use in `model`", cli=None)
    max_logprobs: int = arg(20, "largest logprobs a request may ask", cli=None)
    disable_log_stats: bool = arg(False, "no periodic stats log line", kind=FRONTEND, cli=None)
    # vLLM tuning flags with no meaning here (NOT_NEEDED says why).
    use_v2_block_manager: bool = arg(False, kind=NOT_NEEDED_KIND, action="store_true")
    trust_remote_code: bool = arg(False, kind=NOT_NEEDED_KIND, action="store_true")
    weights_load_device: str | None = arg(None, kind=NOT_NEEDED_KIND)
    swap_space: float | None = arg(None, kind=NOT_NEEDED_KIND, type=float)
    max_seq_len_to_capture: int | None = arg(None, kind=NOT_NEEDED_KIND, type=parse_length)
    disable_custom_all_reduce: bool = arg(False, kind=NOT_NEEDED_KIND, action="store_true")
    # vLLM features herd does not have.
    enable_lora: bool = arg(False, kind=UNSUPPORTED, action="store_true")
    speculative_config: str | dict | None = arg(None, kind=UNSUPPORTED)
    kv_transfer_config: str | dict | None = arg(None, kind=UNSUPPORTED)

    def __post_init__(self):
        if self.num_gpu_blocks_override is not None:
            if self.num_kv_blocks is not None and self.num_kv_blocks != self.num_gpu_blocks_override:
                raise ValueError("give num_kv_blocks or num_gpu_blocks_override, not both")
            self.num_kv_blocks, self.num_gpu_blocks_override = self.num_gpu_blocks_override, None
        if self.max_model_len is not None:
            try:
                self.max_model_len = parse_max_model_len(self.max_model_len)
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"max_model_len: {e}") from None
        if self.max_num_batched_tokens is not None:
            self.max_num_batched_tokens = parse_length(self.max_num_batched_tokens)

    # -- CLI ---------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        engine = parser.add_argument_group("engine")
        groups = {ENGINE: engine, FRONTEND: engine,
                  NOT_NEEDED_KIND: parser.add_argument_group("accepted for vLLM compatibility, not needed"),
                  UNSUPPORTED: parser.add_argument_group("vLLM features herd does not have (fail with a message)")}
        flag(engine, "config", help="YAML file of flags (keys are flag names); flags given here win")
        for f in fields(cls):
            meta = f.metadata
            if meta["cli"] is None:
                continue
            name = meta["cli"] or f.name
            help_text = meta["help"] or None
            if meta["kind"] == NOT_NEEDED_KIND:
                help_text = NOT_NEEDED[f.name]
            elif meta["kind"] == UNSUPPORTED and not help_text:
                help_text = f"{UNSUPPORTED_FEATURES[f.name]}: not supported"
            kw = dict(meta["argparse"], dest=f.name, help=help_text)
            if kw.get("action") is argparse.BooleanOptionalAction:
                bool_flag(groups[meta["kind"]], name, None, help_text, dest=f.name)
                continue
            # store_true flags default to None too: unset means the engine's default
            kw["default"] = None if kw.get("action") == "store_true" or f.default is MISSING else f.default
            flag(groups[meta["kind"]], name, *meta["flags"], **kw)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """From parsed flags; fields the parser does not define (the server's) keep their defaults
        unless the namespace has them."""
        kw = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                kw[f.name] = value
        kw.pop("model", None)
        model = getattr(args, "model", None)
        return cls(model=model, **kw)

    # -- to the engine -----------------------------------------------------------------------
    def check_supported(self) -> None:
        """NotImplementedError naming a vLLM feature herd does not have, when one is asked for."""
        for name in UNSUPPORTED_FEATURES:
            value = getattr(self, name)
            if name == "pipeline_parallel_size":
                asked = value is not None and value != 1
            elif name == "cpu_offload_gb":  # on the CPU the weights are in host memory already
                asked = bool(value) and (self.device or _default_device()) != "cpu"
            else:
                asked = bool(value)
            if asked:
                raise not_supported(name)

    def notices(self) -> list[str]:
        return [f"notice: --{name.replace('_', '-')} is accepted for vLLM compatibility and not needed: {why}"
                for name, why in NOT_NEEDED.items() if getattr(self, name) not in (None, False)]

    def engine_kwargs(self) -> dict:
        """EngineConfig.from_kwargs arguments (unset ones are left to the engine's defaults);
        prints the notices, raises for unsupported features."""
        self.check_supported()
        for line in self.notices():
            print(line, file=sys.stderr)
        kw = {f.name: getattr(self, f.name) for f in fields(self)
              if f.metadata["kind"] == ENGINE and f.name not in ("model", "num_gpu_blocks_override")}
        if self.guided_decoding_backend is not None:
            if self.structured_outputs_config is not None:
                raise ValueError("give --structured-outputs-config or --guided-decoding-backend, not both")
            kw["structured_outputs_config"] = {"backend": self.guided_decoding_backend}
        return {k: v for k, v in kw.items() if v is not None}

    def create_engine_config(self, **extra):
        """The EngineConfig; `extra` may name further EngineConfig fields (TypeError otherwise)."""
        from herd.config import EngineConfig
        from herd.hub.default import default_model_path

        return EngineConfig.from_kwargs(self.model or default_model_path(), **self.engine_kwargs(), **extra)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class AsyncEngineArgs(EngineArgs):
    """EngineArgs of AsyncLLMEngine (vLLM's name); the same fields plus request logging."""
    enable_log_requests: bool = arg(False, "log each request", kind=FRONTEND, cli=None)


def add_engine_args(parser: argparse.ArgumentParser):
    EngineArgs.add_cli_args(parser)


def engine_kwargs(args) -> dict:
    """EngineConfig.from_kwargs arguments from parsed flags (unset ones are left to defaults)."""
    return EngineArgs.from_cli_args(args).engine_kwargs()


# ---- --config FILE --------------------------------------------------------------------------------

def config_file_args(path: str, parser: argparse.ArgumentParser, argv: list[str], have_model: bool) -> list[str]:
    """vLLM's --config: a YAML mapping of flag names (either spelling) to values, as flags; the
    ones argv already gives are left out, so the command line wins (`model` too, when argv names
    one: `have_model`). true -> --flag, false -> --no-flag (or nothing), lists -> several values,
    objects -> JSON."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of flag names to values")
    known = parser._option_string_actions
    given = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    out: list[str] = []
    for key, value in data.items():
        opt = "--" + str(key)
        action = known.get(opt) or known.get("--" + str(key).replace("_", "-"))
        if action is None:
            raise ValueError(f"--config {path}: unknown flag {key!r}")
        if given & set(action.option_strings) or value is None:
            continue
        if action.dest == "model" and have_model:
            continue
        if isinstance(value, bool):
            if value:
                out.append(action.option_strings[0])
            elif "--no-" + action.option_strings[0][2:] in known:
                out.append("--no-" + action.option_strings[0][2:])
        elif isinstance(value, list):
            out += [action.option_strings[0], *map(str, value)]
        elif isinstance(value, dict):
            out += [action.option_strings[0], json.dumps(value)]
        else:
            out += [action.option_strings[0], str(value)]
    return out
