"""Uniprocess executor: the ModelRunner in the engine process (tensor_parallel_size 1)."""
from __future__ import annotations

from herd.config import EngineConfig


class UniProcExecutor:
    """Everything in this process (tensor_parallel_size == 1)."""

    def __init__(self, config: EngineConfig):
        from herd.engine.runner import ModelRunner
        from herd.quant.methods import build_quant_methods
        self.runner = ModelRunner(config, quant=build_quant_methods(config))
        self.device = self.runner.device
        self._closed = False

    def determine_num_blocks(self) -> dict[str, int]:
        return self.runner.determine_num_blocks()

    def allocate_kv_cache(self, num_blocks: dict[str, int]):
        self.runner.allocate_kv_cache(num_blocks)

    def execute(self, batch):
        return self.runner.execute(batch)

    def check_health(self):
        pass

    def shutdown(self) -> list:
        """Finish the runner once (INC MEASURE writes its files); returns what it wrote."""
        if self._closed:
            return []
        self._closed = True
        return self.runner.finish()
