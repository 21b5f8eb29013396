"""Executors run the ModelRunner on one or more ranks. The engine talks only to this interface:
determine_num_blocks(), allocate_kv_cache(num_blocks), execute(batch) -> StepOutput, shutdown()."""
from __future__ import annotations

from herd.config import EngineConfig


def build_quant_methods(config: EngineConfig):
    if config.quant.quantization is None:
        return None
    from herd.quant.methods import get_quant_methods
    return get_quant_methods(config)


class UniProcExecutor:
    """Everything in this process (tensor_parallel_size == 1)."""

    def __init__(self, config: EngineConfig):
        from herd.engine.runner import ModelRunner
        self.runner = ModelRunner(config, quant=build_quant_methods(config))
        self.device = self.runner.device

    def determine_num_blocks(self) -> dict[str, int]:
        return self.runner.determine_num_blocks()

    def allocate_kv_cache(self, num_blocks: dict[str, int]):
        self.runner.allocate_kv_cache(num_blocks)

    def execute(self, batch):
        return self.runner.execute(batch)

    def shutdown(self):
        pass


def make_executor(config: EngineConfig):
    backend = config.parallel.distributed_executor_backend
    if config.parallel.tensor_parallel_size == 1 and backend in (None, "uni", "mp"):
        return UniProcExecutor(config)
    raise NotImplementedError(f"tensor_parallel_size={config.parallel.tensor_parallel_size} with "
                              f"backend {backend!r} is not available yet")
