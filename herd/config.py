"""EngineConfig: built once from CLI flags or LLM(...) kwargs and passed down.

This is the only module that reads environment variables (QUANT_CONFIG, HERD_API_KEY, HERD_CACHE).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch

from herd.model.config import Llama4TextConfig
from herd.gguf import gguf_cache_dir, is_gguf_path

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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class CompilationConfig:
    """vLLM's -O / --compilation-config: `level` 0 runs eagerly; >= 1 compiles the model with
    torch.compile (`backend`). Decode steps are captured per batch-size bucket: CUDA graphs on
    CUDA (unless enforce_eager), compiled graphs on the CPU when level >= 1."""
    level: int | None = None                      # None: 0 on CPU, 3 on CUDA (graphs only)
    backend: str = "inductor"
    cudagraph_capture_sizes: list[int] | None = None

    @classmethod
    def parse(cls, value) -> "CompilationConfig":
        """An int level, a JSON object string, a dict or a CompilationConfig."""
        import json
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls(level=value)
        if isinstance(value, str):
            text = value.strip()
            if text.lstrip("-").isdigit():
                return cls(level=int(text))
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"compilation config {value!r} is neither a level nor a JSON object") from None
        if not isinstance(value, dict):
            raise ValueError(f"compilation config must be a level or a JSON object, got {value!r}")
        known = {f.name for f in fields(cls)} | {"mode"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown compilation config keys {sorted(unknown)}; known: {sorted(known)}")
        value = dict(value)
        if "mode" in value:  # newer vLLM spelling of level
            value.setdefault("level", value.pop("mode"))
        cfg = cls(**value)
        if cfg.cudagraph_capture_sizes is not None and (
                not cfg.cudagraph_capture_sizes or any(int(n) <= 0 for n in cfg.cudagraph_capture_sizes)):
            raise ValueError("cudagraph_capture_sizes must be positive batch sizes")
        return cfg

    def capture_sizes(self, max_num_seqs: int) -> list[int]:
        """vLLM's default buckets: 1, 2, 4, then every 8, up to max_num_seqs."""
        if self.cudagraph_capture_sizes is not None:
            return sorted({min(int(n), max_num_seqs) for n in self.cudagraph_capture_sizes})
        sizes = [1, 2, 4] + list(range(8, max_num_seqs + 8, 8))
        return sorted({min(n, max_num_seqs) for n in sizes})


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
    hf_config: Llama4TextConfig | None = None
    torch_dtype: torch.dtype = torch.bfloat16

    def finalize(self, device: str):
        self.compilation_config = CompilationConfig.parse(self.compilation_config)
        if self.hf_config is None and is_gguf_path(self.model):
            self._convert_gguf()
        if self.hf_config is None:
            self.hf_config = Llama4TextConfig.from_pretrained(self.model)
        self.torch_dtype = resolve_dtype(self.dtype, self.hf_config.torch_dtype, device)
        limit = self.hf_config.max_position_embeddings
        if self.max_model_len is None:
            self.max_model_len = min(limit, 8192)
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.tokenizer is None:
            self.tokenizer = self.model

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
