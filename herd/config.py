"""EngineConfig: built once from CLI flags or LLM(...) kwargs and passed down.

This is the only module that reads environment variables (QUANT_CONFIG, HERD_API_KEY,
HERD_ALLOW_LONG_MAX_MODEL_LEN / VLLM_ALLOW_LONG_MAX_MODEL_LEN, HERD_ENABLE_MULTIPROCESSING /
VLLM_ENABLE_V1_MULTIPROCESSING, and the Hugging Face hub's HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE,
HF_ENDPOINT), apart from herd's cache folder (HERD_CACHE / XDG_CACHE_HOME, herd.hub.herd_cache)
and the CPU kernels' C compiler (CC, herd.ops.cpu.build).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from types import MappingProxyType

import torch

from herd.model.config import Llama4TextConfig
from herd.gguf import gguf_cache_dir, is_gguf_path
from herd.hub.aliases import resolve_alias
from herd.hub.hf_cache import HubSettings, is_repo_id, resolve_repo_id
from herd.json_args import parse_json_object

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str = "bfloat16",
                  device: str = "cpu") -> torch.dtype:
    """vLLM semantics: "auto" takes the checkpoint dtype (float32 stays float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = checkpoint_dtype or "bfloat16"
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of auto, float32, bfloat16, float16")
    return _DTYPES[dtype]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_settings(download_dir: str | None = None) -> HubSettings:
    """Where Hugging Face repo ids are looked up: --download-dir, else $HF_HUB_CACHE, else
    $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's own order)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    cache = download_dir or env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return HubSettings(cache_dir=os.path.expanduser(cache), offline=_env_flag("HF_HUB_OFFLINE"),
                       endpoint=env.get("HF_ENDPOINT") or "https://huggingface.co")


def allow_long_max_model_len() -> bool:
    return _env_flag("HERD_ALLOW_LONG_MAX_MODEL_LEN") or _env_flag("VLLM_ALLOW_LONG_MAX_MODEL_LEN")


# Modalities --limit-mm-per-prompt may name (herd takes images; limits on the others change nothing).
MM_MODALITIES = ("image", "video", "audio")
# generation_config.json fields that are sampling defaults (vLLM's "auto" generation config).
GENERATION_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def parse_mm_limits(value) -> dict[str, int] | None:
    """vLLM's --limit-mm-per-prompt: `image=10,video=0`, JSON `{"image": 10}` (an item may also be
    `{"count": 10, ...}`) or a dict. None: no limit."""
    if value is None or isinstance(value, dict) and not value:
        return None
    if isinstance(value, str) and not value.strip().startswith("{"):
        pairs = {}
        for item in filter(None, (p.strip() for p in value.split(","))):
            key, sep, count = item.partition("=")
            if not sep:
                raise ValueError(f"limit_mm_per_prompt: expected MODALITY=COUNT items like image=10, got {item!r}")
            pairs[key.strip()] = count.strip()
        value = pairs
    value = parse_json_object(value, "limit_mm_per_prompt")
    limits = {}
    for modality, count in value.items():
        if modality not in MM_MODALITIES:
            raise ValueError(f"limit_mm_per_prompt: unknown modality {modality!r}; known: {', '.join(MM_MODALITIES)}")
        if isinstance(count, dict):
            count = count.get("count")
        try:
            limits[modality] = int(count)
        except (TypeError, ValueError):
            raise ValueError(f"limit_mm_per_prompt: {modality} needs a whole number, got {count!r}") from None
        if limits[modality] < 0:
            raise ValueError(f"limit_mm_per_prompt: {modality} must be >= 0, got {limits[modality]}")
    return limits


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# On the CPU, inductor's own GEMM template (weights frozen into the graph and prepacked, then
# autotuned against MKL per shape) reads a decode step's weights 2-2.5x faster than MKL's GEMV
# (docs/benchmarks.md). Frozen weights are a second copy, in memory, of the weights of the GEMMs
# inductor runs itself (in fp32 herd's CPU kernels run the linears and experts instead). The
# last two keep autotuning's per-GEMM timing tables off the server's stderr/stdout.
CPU_INDUCTOR_DEFAULTS = MappingProxyType(
    {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
     "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False})


@dataclass
class CompilationConfig:
    """vLLM's -O / --compilation-config: `level` 0 runs eagerly; >= 1 compiles the model with
    torch.compile (`backend`). Decode steps are captured per batch-size bucket: CUDA graphs on
    CUDA (unless enforce_eager), compiled graphs on the CPU when level >= 1."""
    level: int | None = None                      # None: 0 on CPU, 3 on CUDA (graphs only)
    backend: str = "inductor"
    cudagraph_capture_sizes: list[int] | None = None
    # inductor options (vLLM's name), on top of herd's CPU defaults (CPU_INDUCTOR_DEFAULTS)
    inductor_compile_config: dict | None = None

    @classmethod
    def parse(cls, value) -> "CompilationConfig":
        """An int level, a JSON object string, a dict or a CompilationConfig."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls(level=value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return cls(level=int(value.strip()))
        try:
            value = parse_json_object(value, "compilation config")
        except ValueError:
            raise ValueError(f"compilation config {value!r} is neither a level nor a JSON object") from None
        known = {f.name for f in fields(cls)} | {"mode"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown compilation config keys {sorted(unknown)}; known: {sorted(known)}")
        if "mode" in value:  # newer vLLM spelling of level
            value.setdefault("level", value.pop("mode"))
        cfg = cls(**value)
        if cfg.inductor_compile_config is not None and not isinstance(cfg.inductor_compile_config, dict):
            raise ValueError("inductor_compile_config must be a JSON object of inductor options")
        if cfg.cudagraph_capture_sizes is not None and (
                not cfg.cudagraph_capture_sizes or any(int(n) <= 0 for n in cfg.cudagraph_capture_sizes)):
            raise ValueError("cudagraph_capture_sizes must be positive batch sizes")
        return cfg

    def capture_sizes(self, max_num_seqs: int, device_type: str = "cuda") -> list[int]:
        """vLLM's default buckets on CUDA: 1, 2, 4, then every 8, up to max_num_seqs. On the CPU
        powers of two: each size is a compile of tens of seconds there, and a decode step's GEMMs
        are bound by reading the weights, so padding a batch up to 2x costs little."""
        if self.cudagraph_capture_sizes is not None:
            return sorted({min(int(n), max_num_seqs) for n in self.cudagraph_capture_sizes})
        if device_type == "cpu":
            sizes = [1 << i for i in range(max(1, max_num_seqs).bit_length() + 1)]
        else:
            sizes = [1, 2, 4] + list(range(8, max_num_seqs + 8, 8))
        return sorted({min(n, max_num_seqs) for n in sizes})

    def inductor_options(self, device_type: str) -> dict:
        """The options torch.compile's inductor gets: herd's CPU defaults, then the user's."""
        opts = dict(CPU_INDUCTOR_DEFAULTS) if device_type == "cpu" else {}
        opts.update(self.inductor_compile_config or {})
        return opts


@dataclass
class ModelConfig:
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    served_model_name: list[str] | None = None
    tokenizer: str | None = None
    max_logprobs: int = 20                    # largest logprobs / prompt_logprobs a request may ask
    attention_backend: str | None = None      # auto | reference | sdpa | triton
    enforce_eager: bool = False               # never capture or compile (vLLM's flag)
    compilation_config: CompilationConfig | None = None
    # herd.structured_output.StructuredOutputsConfig, or a dict / JSON text / backend name for one
    structured_outputs_config: object = None
    revision: str | None = None               # hub revision (branch, tag, commit) of a repo-id model
    tokenizer_revision: str | None = None     # hub revision of a repo-id tokenizer
    download_dir: str | None = None           # hub cache repo ids are read from / downloaded to
    limit_mm_per_prompt: dict[str, int] | None = None   # most images (etc.) per prompt; None: no limit
    generation_config: str = "auto"           # auto: the model's generation_config.json; vllm: none; or a folder
    override_generation_config: dict | None = None      # on top of it, e.g. {"temperature": 0.6}
    hf_config: Llama4TextConfig | None = None
    torch_dtype: torch.dtype = torch.bfloat16

    def finalize(self, device: str):
        self.compilation_config = CompilationConfig.parse(self.compilation_config)
        from herd.structured_output.config import StructuredOutputsConfig
        self.structured_outputs_config = StructuredOutputsConfig.parse(self.structured_outputs_config)
        self.limit_mm_per_prompt = parse_mm_limits(self.limit_mm_per_prompt)
        self.override_generation_config = parse_json_object(self.override_generation_config,
                                                            "override_generation_config")
        if self.generation_config not in ("auto", "vllm") and not os.path.isdir(self.generation_config):
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder with a generation_config.json; "
                             f"{self.generation_config!r} is none of them")
        if self.hf_config is None:
            self.model = self.resolve_source(self.model, self.revision, "model")
        if self.tokenizer is not None and self.tokenizer != self.model:
            self.tokenizer = self.resolve_source(self.tokenizer, self.tokenizer_revision, "tokenizer")
        if self.hf_config is None and is_gguf_path(self.model):
            self._convert_gguf()
        if self.hf_config is None:
            self.hf_config = Llama4TextConfig.from_pretrained(self.model)
        if "attn_temperature_tuning" in self.override_generation_config:  # vLLM's Llama 4 override
            self.hf_config.attn_temperature_tuning = bool(self.override_generation_config["attn_temperature_tuning"])
        self.torch_dtype = resolve_dtype(self.dtype, self.hf_config.torch_dtype, device)
        self._verify_max_model_len(self.hf_config.max_position_embeddings)
        if self.tokenizer is None:
            self.tokenizer = self.model

    def resolve_source(self, name: str, revision: str | None, what: str) -> str:
        """A model or tokenizer name -> what the loaders read. In order: an existing path stays as
        it is; a short name (herd.hub.aliases) becomes its path; a .gguf name is converted later; a
        Hugging Face repo id becomes its snapshot folder in the hub cache (downloaded only when not
        cached, the hub is reachable and not offline)."""
        if os.path.exists(name):
            return name
        alias = resolve_alias(name)
        if alias is not None:
            return alias
        if is_gguf_path(name):
            return name
        if not is_repo_id(name):
            raise FileNotFoundError(f"{what} {name!r} does not exist: it is neither a local folder or file nor "
                                    "a Hugging Face repo id (org/name)")
        return resolve_repo_id(name, revision, hub_settings(self.download_dir), what)

    def _verify_max_model_len(self, limit: int):
        """vLLM's rule: default min(context, 8192) here; above the model's context only when
        HERD_ALLOW_LONG_MAX_MODEL_LEN (or VLLM_ALLOW_LONG_MAX_MODEL_LEN) is set."""
        if self.max_model_len in (None, "auto", -1):
            self.max_model_len = min(limit, 8192)
        if not isinstance(self.max_model_len, int) or isinstance(self.max_model_len, bool):
            raise ValueError(f"max_model_len must be a whole number of tokens or 'auto', got {self.max_model_len!r}")
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.max_model_len > limit and not allow_long_max_model_len():
            raise ValueError(
                f"User-specified max_model_len ({self.max_model_len}) is greater than the derived max_model_len "
                f"(max_position_embeddings={limit} in the model's config.json). To allow overriding this "
                "maximum, set the env var HERD_ALLOW_LONG_MAX_MODEL_LEN=1 (or VLLM_ALLOW_LONG_MAX_MODEL_LEN=1); "
                "positions past the trained context give wrong outputs")

    def try_get_generation_config(self) -> dict:
        """generation_config.json of the model ('auto', 'vllm') or of the `generation_config` folder;
        {} when there is none."""
        folder = self.model if self.generation_config in ("auto", "vllm") else self.generation_config
        path = os.path.join(folder, "generation_config.json")
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def generation_defaults(self) -> dict:
        """What the engine takes from the generation config: its EOS ids always; its sampling
        defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) unless
        generation_config is 'vllm'; override_generation_config on top (vLLM's semantics)."""
        cfg = self.try_get_generation_config()
        if self.generation_config == "vllm":
            cfg = {k: v for k, v in cfg.items() if k not in GENERATION_SAMPLING_FIELDS}
        cfg.update(self.override_generation_config or {})
        if "max_tokens" in cfg:  # vLLM's name for max_new_tokens in overrides
            cfg["max_new_tokens"] = cfg.pop("max_tokens")
        return cfg

    def _convert_gguf(self):
        """A .gguf file becomes its converted HF folder (cached) before anything reads the model;
        float32 / float16 runs get weights dequantized to that dtype, others bf16."""
        from herd.gguf import gguf_to_hf

        source = self.model
        wanted = resolve_dtype(self.dtype) if self.dtype != "auto" else torch.bfloat16
        dtype = {torch.float32: "float32", torch.float16: "float16"}.get(wanted, "bfloat16")
        self.model = gguf_to_hf(source, gguf_cache_dir(), dtype)
        if self.tokenizer is None or self.tokenizer == source:
            self.tokenizer = self.model


@dataclass
class CacheConfig:
    block_size: int = 128
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None          # explicit pool size (blocks), overrides sizing
    cpu_kv_cache_space_gib: float = 1.0       # pool size on CPU when num_kv_blocks is not set
    kv_cache_dtype: str = "auto"              # auto | fp8 | fp8_inc | fp8_e4m3
    enable_prefix_caching: bool = True

    def validate(self):
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_inc", "fp8_e4m3"):
            raise ValueError(f"unsupported kv_cache_dtype {self.kv_cache_dtype!r}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # per-step token budget; default max(2048, max_model_len)
    enable_chunked_prefill: bool = True
    async_scheduling: bool = False  # schedule step N+1 while step N runs (herd/engine/scheduler.py)

    def finalize(self, max_model_len: int):
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(2048, max_model_len) if not self.enable_chunked_prefill else 2048
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ValueError("max_num_batched_tokens must be >= max_model_len when chunked prefill is off")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # mp | ray | uni
    enable_expert_parallel: bool = False

    def validate(self):
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.distributed_executor_backend not in (None, "mp", "ray", "uni"):
            raise ValueError(f"unknown distributed_executor_backend {self.distributed_executor_backend!r}")


@dataclass
class QuantConfig:
    quantization: str | None = None       # None | inc | fp8 | compressed-tensors
    quant_config_path: str | None = None  # INC QUANT_CONFIG json

    def finalize(self, hf_raw: dict):
        q = self.quantization
        ckpt_q = (hf_raw or {}).get("quantization_config")
        if q is None and ckpt_q and ckpt_q.get("quant_method") == "compressed-tensors":
            self.quantization = "compressed-tensors"
        if self.quantization == "inc" and self.quant_config_path is None:
            self.quant_config_path = os.environ.get("QUANT_CONFIG")
        if self.quantization not in (None, "inc", "fp8", "compressed-tensors"):
            raise ValueError(f"unsupported quantization {self.quantization!r}; "
                             "choose inc, fp8 or compressed-tensors")


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    device: str = field(default_factory=default_device)

    @classmethod
    def from_kwargs(cls, model: str, **kw) -> "EngineConfig":
        """Map flat vLLM-style kwargs (LLM(...) or CLI flags) onto sub-configs."""
        parts = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                 "parallel": ParallelConfig, "quant": QuantConfig}
        values: dict[str, dict] = {k: {} for k in parts}
        device = kw.pop("device", None) or default_device()
        for key, val in kw.items():
            if val is None:
                continue
            for part, klass in parts.items():
                if key in {f.name for f in fields(klass)}:
                    values[part][key] = val
                    break
            else:
                raise TypeError(f"unexpected engine argument {key!r}")
        cfg = cls(model=ModelConfig(model=model, **values["model"]),
                  cache=CacheConfig(**values["cache"]),
                  scheduler=SchedulerConfig(**values["scheduler"]),
                  parallel=ParallelConfig(**values["parallel"]),
                  quant=QuantConfig(**values["quant"]), device=device)
        cfg.finalize()
        return cfg

    def finalize(self):
        self.model.finalize(self.device)
        self.cache.validate()
        self.scheduler.finalize(self.model.max_model_len)
        self.parallel.validate()
        self.quant.finalize(self.model.hf_config.raw)


def api_key_from_env() -> str | None:
    """$HERD_API_KEY, else $VLLM_API_KEY, else None. A variable that is set but empty (or only
    whitespace) is an error: it would otherwise silently turn authentication off."""
    for name in ("HERD_API_KEY", "VLLM_API_KEY"):
        value = os.environ.get(name)
        if value is None:
            continue
        if not value.strip():
            raise ValueError(f"${name} is set but empty; set it to the API key, or unset it to serve "
                             "without authentication")
        return value
    return None


def multiprocessing_from_env() -> tuple[str, bool] | None:
    """$HERD_ENABLE_MULTIPROCESSING, else vLLM's $VLLM_ENABLE_V1_MULTIPROCESSING, as (name, value):
    0 runs `herd serve`'s engine in the API server process, 1 in an engine core process (the
    default). None when neither is set."""
    for name in ("HERD_ENABLE_MULTIPROCESSING", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        value = os.environ.get(name, "").strip().lower()
        if not value:
            continue
        if value in ("1", "true", "yes", "on"):
            return name, True
        if value in ("0", "false", "no", "off"):
            return name, False
        raise ValueError(f"${name} must be 0 or 1, got {os.environ[name]!r}")
    return None


def cuda_visible_devices() -> list[str] | None:
    """$CUDA_VISIBLE_DEVICES as a list, None when unset: data-parallel engine cores each take a slice."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [d.strip() for d in value.split(",") if d.strip()]
