"""Executors run the ModelRunner on one or more ranks. The engine talks only to this interface:
determine_num_blocks(), allocate_kv_cache(num_blocks), execute(batch) -> StepOutput,
check_health(), shutdown(), and the `device` that per-request generators live on.

  uni  everything in the engine process (tensor_parallel_size 1)
  mp   rank 0 in the engine process, ranks 1..N-1 in spawned worker processes (default for N > 1)
  ray  rank 0 in the engine process, ranks 1..N-1 as Ray actors (multi-node)
"""
from __future__ import annotations

from herd.config import EngineConfig
from herd.parallel.uniproc_executor import UniProcExecutor


def check_shardable(config: EngineConfig):
    """The layers' own checks, made before any worker starts (a clear error, nothing to clean up)."""
    hf, size = config.model.hf_config, config.parallel.tensor_parallel_size
    dims = {"num_attention_heads": hf.num_attention_heads}
    if len(hf.moe_layers) < hf.num_hidden_layers:  # dense layers
        dims["intermediate_size_mlp"] = hf.intermediate_size_mlp
    if hf.moe_layers:  # the shared expert is always split; routed experts too unless EP
        dims["intermediate_size"] = hf.intermediate_size
        if config.parallel.enable_expert_parallel:
            dims["num_local_experts"] = hf.num_local_experts
    for name, n in dims.items():
        if n % size:
            raise ValueError(f"{name}={n} is not divisible by tensor_parallel_size={size}")
    kv = hf.num_key_value_heads
    if kv % size and size % kv:
        raise ValueError(f"num_key_value_heads={kv} and tensor_parallel_size={size}: one must divide the other "
                         "(KV heads are split, or replicated when there are more ranks than heads)")


def make_executor(config: EngineConfig):
    pc = config.parallel
    size, backend = pc.tensor_parallel_size, pc.distributed_executor_backend
    check_shardable(config)
    if backend is None:
        backend = "uni" if size == 1 else "mp"
    if backend == "uni":
        if size != 1:
            raise ValueError(f"distributed_executor_backend 'uni' runs one rank; tensor_parallel_size={size} "
                             "needs 'mp' or 'ray'")
        return UniProcExecutor(config)
    if backend == "mp":
        if size == 1:
            return UniProcExecutor(config)  # nothing to distribute
        from herd.parallel.mp_executor import MultiprocExecutor
        return MultiprocExecutor(config)
    if backend == "ray":
        from herd.parallel.ray_executor import RayExecutor
        return RayExecutor(config)
    raise ValueError(f"unknown distributed_executor_backend {backend!r}; choose mp, ray or uni")
