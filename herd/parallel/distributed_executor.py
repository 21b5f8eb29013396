"""Shared driver logic of the multi-rank executors (mp and ray).

Rank 0 (the driver) lives in the engine process and owns sampling; ranks 1..N-1 live elsewhere.
Each step the driver sends every worker the step's SchedulerOutput (small diffs against the
persistent batch each runner keeps), then all ranks run the forward together (the collectives are
in the model) and only the driver's sampled tokens are used. Any failure is fatal: the ranks' collectives are out of step
afterwards, so the executor shuts everything down and raises an ExecutorError naming the rank.
"""
from __future__ import annotations

import logging

from herd.config import EngineConfig
from herd.engine.protocol import StepOutput
from herd.parallel.distributed import DistInit, backend_for, serve_store
from herd.parallel.worker import Worker

logger = logging.getLogger(__name__)


class ExecutorError(RuntimeError):
    """A tensor-parallel rank died or failed; the engine cannot continue."""


class DistributedExecutor:
    """Subclasses implement: _master_host, _start_workers, _send, _collect, _send_step,
    _finish_step, _describe_failure, _stop_workers."""

    failure_wait_s = 2.0  # how long a failed step waits to learn which worker caused it

    def __init__(self, config: EngineConfig, timeout_s: float | None = None):
        self.config = config
        self.world_size = config.parallel.tensor_parallel_size
        self.failure: str | None = None
        self._closed = False
        self._ready = False  # every rank loaded
        backend = backend_for(config.device)
        timeout_s = timeout_s or (600.0 if backend == "nccl" else 120.0)
        host = self._master_host()
        store, port = serve_store(host, self.world_size, timeout_s)
        self.init = DistInit(host, port, self.world_size, backend, timeout_s)
        self.driver = Worker(config, 0, self.init, store)
        try:
            self._start_workers()
            self._send("init_distributed")
            self.driver.init_distributed()  # returns once every rank has joined the group
            self._send("load_model")
            self.driver.load_model()
            self._collect()
        except BaseException as e:
            if not isinstance(e, ExecutorError):  # the driver failed; say if a worker did too
                reason = self._describe_failure(0.5)
                if reason is not None:
                    logger.error("while starting the executor: %s", reason)
            self.shutdown()
            raise
        self.runner = self.driver.runner
        self.device = self.runner.device
        self._ready = True

    # -- the engine's interface -------------------------------------------------------------
    def determine_num_blocks(self) -> dict[str, int]:
        """The smallest pool any rank can hold (GPUs may have different free memory)."""
        return self._guard(self._on_all_ranks, "determine_num_blocks",
                           lambda mine, theirs: {g: min([n] + [t[g] for t in theirs]) for g, n in mine.items()})

    def allocate_kv_cache(self, num_blocks: dict[str, int]):
        self._guard(self._on_all_ranks, "allocate_kv_cache", None, num_blocks)

    def execute(self, batch) -> StepOutput:
        self.check_health()
        return self._guard(self._step, batch.output, batch)

    def check_health(self):
        """Raise ExecutorError when a rank is gone (cheap: no round trip to the workers)."""
        if self.failure is not None:
            raise ExecutorError(f"the tensor-parallel executor has stopped: {self.failure}")
        reason = self._describe_failure(0.0)
        if reason is not None:
            self.failure = reason
            raise ExecutorError(reason)

    def shutdown(self) -> list:
        """Stop every rank. After a clean run each rank's runner finishes first (INC MEASURE writes
        its per-rank measurement files); returns what they wrote."""
        if self._closed:
            return []
        written = []
        if self._ready and self.failure is None:
            try:
                self._send("finish")
                written = list(self.driver.runner.finish() or [])
                for results in self._collect():
                    written.extend(results[0] or [])
            except Exception as e:  # noqa: BLE001 - still stop everything
                logger.error("a rank failed while finishing: %s", e)
        self._closed = True
        self._stop_workers()
        self.driver.shutdown()
        return written

    # -- internals --------------------------------------------------------------------------
    def _on_all_ranks(self, method: str, combine, *args):
        self._send(method, *args)
        mine = getattr(self.driver, method)(*args)
        theirs = [results[0] for results in self._collect()]
        return combine(mine, theirs) if combine is not None else mine

    def _step(self, inp, batch) -> StepOutput:
        self._send_step(inp)
        out = self.driver.runner.execute_model(inp, batch)
        self._finish_step()
        return out

    def _guard(self, fn, *args):
        """Run a driver-side call; on any error find out which rank caused it, shut down, raise."""
        try:
            return fn(*args)
        except ExecutorError as e:
            self.failure = self.failure or str(e)
            self.shutdown()
            raise
        except Exception as e:
            reason = self._describe_failure(self.failure_wait_s)  # a dead worker takes a moment to show
            self.failure = reason or f"rank 0 failed: {e!r}"
            self.shutdown()
            if reason is None:
                raise
            raise ExecutorError(reason) from e

    def _master_host(self) -> str:
        raise NotImplementedError

    def _start_workers(self):
        raise NotImplementedError

    def _send(self, method: str, *args):
        """Start `method(*args)` on every worker; its results come from the next _collect()."""
        raise NotImplementedError

    def _collect(self) -> list[list]:
        """Per worker, the results of the calls sent since the last collect (raises ExecutorError)."""
        raise NotImplementedError

    def _send_step(self, inp):
        raise NotImplementedError

    def _finish_step(self):
        pass

    def _describe_failure(self, wait_s: float) -> str | None:
        raise NotImplementedError

    def _stop_workers(self):
        raise NotImplementedError
