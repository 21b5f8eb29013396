"""Ray executor: ranks 1..N-1 as Ray actors (possibly on other nodes), rank 0 in the engine process.

Connects to a running Ray cluster (`ray start --head` / RAY_ADDRESS) or starts a local one. On
CUDA a placement group reserves one GPU per rank; bundle 0 sits on this node and a small holder
actor keeps its GPU, which the driver then uses, so no actor is given the driver's GPU. Ray is an
optional dependency: `pip install herd[ray]`.
"""
from __future__ import annotations

import dataclasses
import os
import time
import weakref

from herd.config import EngineConfig
from herd.parallel.distributed_executor import DistributedExecutor, ExecutorError
from herd.parallel.worker import Worker

_PLACEMENT_TIMEOUT_S = 120.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'herd[ray]' "
                          "(or use the default 'mp' backend on one node)") from None
    return ray


class RayWorkerWrapper:
    """Actor body: one rank's Worker, driven by method name."""

    def __init__(self, config: EngineConfig | None, rank: int, init):
        self.worker = Worker(config, rank, init) if config is not None else None

    def pid(self) -> int:
        return os.getpid()

    def gpu_ids(self) -> list:
        import ray
        return list(ray.get_gpu_ids())

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)


def _release(ray, actors: list, holders: list, placement: list, started: list):
    for actor in actors + holders:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already dead or Ray is gone
            pass
    actors.clear()
    holders.clear()
    if placement:
        from ray.util.placement_group import remove_placement_group
        try:
            remove_placement_group(placement.pop())
        except Exception:  # noqa: BLE001
            pass
    if started and ray.is_initialized():
        started.clear()
        ray.shutdown()


class RayExecutor(DistributedExecutor):
    failure_wait_s = 5.0  # Ray reports a dead actor through its raylet, a little later than a pipe
    def __init__(self, config: EngineConfig, timeout_s: float | None = None):
        self.ray = import_ray()
        self.actors: list = []
        self._holders: list = []      # keeps the driver's GPU reserved
        self._placement: list = []
        self._started: list = []      # non-empty when this executor started the local Ray instance
        self._calls: list[list] = []  # object refs of RPCs not yet collected
        self._step_refs: list = []
        self._finalizer = weakref.finalize(self, _release, self.ray, self.actors, self._holders,
                                           self._placement, self._started)
        super().__init__(config, timeout_s)

    def _master_host(self) -> str:
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address="auto", log_to_driver=False)
            except ConnectionError:  # no cluster running: start a local one
                ray.init(include_dashboard=False, log_to_driver=False)
                self._started.append(True)
        return ray.util.get_node_ip_address()

    def _start_workers(self):
        ray = self.ray
        cuda = self.config.device.startswith("cuda")
        remote = ray.remote(RayWorkerWrapper)
        worker_config = self.config
        if cuda:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            bundles = [{"GPU": 1, "CPU": 1} for _ in range(self.world_size)]
            bundles[0][f"node:{self.init.host}"] = 0.001  # the driver's bundle is on this node
            pg = ray.util.placement_group(bundles, strategy="PACK")
            self._placement.append(pg)
            try:
                ray.get(pg.ready(), timeout=_PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise ExecutorError(f"Ray cannot reserve {self.world_size} GPUs (one per rank, the first on "
                                    f"this node); cluster resources: {ray.cluster_resources()}") from None

            def placed(i):
                return remote.options(num_cpus=0, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=i))
            holder = placed(0).remote(None, 0, None)
            self._holders.append(holder)
            gpu = int(ray.get(holder.gpu_ids.remote())[0])
            self.driver.config = dataclasses.replace(self.config, device=f"cuda:{gpu}")
            worker_config = dataclasses.replace(self.config, device="cuda:0")  # Ray sets CUDA_VISIBLE_DEVICES
            options = [placed(r) for r in range(1, self.world_size)]
        else:
            options = [remote.options(num_cpus=0) for _ in range(1, self.world_size)]
        for rank, opts in enumerate(options, start=1):
            self.actors.append(opts.remote(worker_config, rank, self.init))
        try:
            ray.get([a.pid.remote() for a in self.actors], timeout=_PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ExecutorError(f"Ray did not start {self.world_size - 1} worker actors within "
                                f"{_PLACEMENT_TIMEOUT_S:.0f}s; cluster resources: {ray.cluster_resources()}") from None

    def _send(self, method: str, *args):
        self._calls.append([a.call.remote(method, *args) for a in self.actors])

    def _collect(self) -> list[list]:
        calls, self._calls = self._calls, []
        per_call = [self._wait(refs) for refs in calls]
        return [[results[w] for results in per_call] for w in range(len(self.actors))]

    def _send_step(self, inp):
        ref = self.ray.put(inp)  # one copy in the object store for all actors
        self._step_refs = [a.call.remote("execute_model", ref) for a in self.actors]

    def _finish_step(self):
        refs, self._step_refs = self._step_refs, []
        self._wait(refs)

    def _wait(self, refs: list) -> list:
        """Results in rank order; the first failure (in completion order) is raised at once."""
        ray, pending = self.ray, list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            error = self._error_of(refs.index(ready[0]) + 1, ready[0])
            if error is not None:
                raise ExecutorError(error)
        return ray.get(refs)

    def _error_of(self, rank: int, ref) -> str | None:
        ray = self.ray
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            return f"tensor-parallel worker rank {rank} (Ray actor) died unexpectedly: {e}"
        except ray.exceptions.RayTaskError as e:
            return f"tensor-parallel worker rank {rank} failed:\n{e}"
        return None

    def _describe_failure(self, wait_s: float) -> str | None:
        refs = list(self._step_refs)
        if not refs and wait_s > 0:  # not in a step: ask every actor for a sign of life
            refs = [a.pid.remote() for a in self.actors]
        deadline, pending = time.monotonic() + wait_s, list(refs)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1,
                                           timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            error = self._error_of(refs.index(ready[0]) + 1, ready[0])
            if error is not None:
                return error
        return None

    def _stop_workers(self):
        self._step_refs, self._calls = [], []
        self._finalizer()
