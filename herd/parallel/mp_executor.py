"""Multiprocessing executor: ranks 1..N-1 in worker processes started with `spawn`, one pipe each.

Steps are fire-and-forget (the collectives keep the ranks in step); RPCs during start-up wait on
the pipe and the process sentinel together, so a worker that dies is reported at once instead of
being waited on. A worker whose process disappears is named with its exit code or signal.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import sys
import threading
import time
import weakref
from multiprocessing.connection import wait

from herd.config import EngineConfig
from herd.parallel.distributed_executor import DistributedExecutor, ExecutorError
from herd.parallel.worker import worker_main


# A spawned worker re-imports the parent's main script; one that creates an engine at import time
# (no `if __name__ == "__main__":` guard) would start workers of its own. It exits with this code.
SPAWN_REIMPORT_EXIT = 86
SPAWN_REIMPORT_HELP = ("the script creates the engine when it is imported, and tensor-parallel workers start with "
                       "`spawn`, which imports the script again in each worker: put the code that creates the "
                       "LLM under `if __name__ == \"__main__\":`")


def check_not_spawn_reimport() -> None:
    """Called where an engine is created: inside a worker that is still importing the parent's
    script, say what to do and exit (the parent reports the same) instead of starting workers."""
    if getattr(mp.current_process(), "_inheriting", False):
        print(f"herd: error: {SPAWN_REIMPORT_HELP}", file=sys.stderr)
        raise SystemExit(SPAWN_REIMPORT_EXIT)


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _stop(procs, conns, grace_s: float = 2.0):
    """Ask politely (a shutdown message, then EOF on the pipe), wait a little, then kill."""
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("shutdown", (), False)))
        except (OSError, ValueError):
            pass
        conn.close()
    join_or_kill(procs, grace_s, kill_wait_s=2.0)


def join_or_kill(procs, timeout: float, kill_wait_s: float) -> None:
    """Wait up to `timeout` seconds in all for the processes to exit; kill the ones still alive."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(kill_wait_s)


class MultiprocExecutor(DistributedExecutor):
    def __init__(self, config: EngineConfig, timeout_s: float | None = None):
        self.procs: list = []
        self.conns: list = []
        self._pending = 0      # replies owed by every worker
        self._finalizer = None
        self._lock = threading.Lock()  # check_health may come from another thread (the server's)
        super().__init__(config, timeout_s)

    def _master_host(self) -> str:
        return "127.0.0.1"

    def _start_workers(self):
        check_not_spawn_reimport()
        ctx = mp.get_context("spawn")  # fork is unsafe with threads, CUDA and gloo state
        # Workers go with the executor even if nobody calls shutdown() (the lists fill in place).
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        for rank in range(1, self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(self.config, rank, self.init, child),
                               name=f"herd-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._pending = 1  # each worker says hello with its pid once it has imported herd
        self._collect()

    def _send(self, method: str, *args):
        self._broadcast((method, args, True))
        self._pending += 1

    def _send_step(self, inp):
        self._broadcast(("execute_model", (inp,), False))

    def _broadcast(self, message):
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError:  # broken pipe: the worker is gone
                raise ExecutorError(self._describe_failure(2.0) or f"cannot reach tensor-parallel rank {rank}")

    def _collect(self) -> list[list]:
        results = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            got = []
            while len(got) < self._pending:
                wait([conn, proc.sentinel])
                if not conn.poll():  # the process ended without a message
                    raise ExecutorError(self._dead(rank, proc))
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    raise ExecutorError(self._dead(rank, proc)) from None
                if kind == "error":
                    raise ExecutorError(self._failed(rank, payload))
                got.append(payload)
            results.append(got)
        self._pending = 0
        return results

    def _describe_failure(self, wait_s: float) -> str | None:
        with self._lock:
            return self._find_failure(wait_s)

    def _find_failure(self, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while True:
            for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
                if not conn.closed and conn.poll():
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        kind, payload = None, None
                    if kind == "error":
                        return self._failed(rank, payload)
                if proc.exitcode is not None:
                    return self._dead(rank, proc)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            wait([p.sentinel for p in self.procs] + [c for c in self.conns if not c.closed], left)

    @staticmethod
    def _dead(rank: int, proc) -> str:
        proc.join(1.0)
        if proc.exitcode == SPAWN_REIMPORT_EXIT:
            return f"tensor-parallel worker rank {rank} could not start: {SPAWN_REIMPORT_HELP}"
        return (f"tensor-parallel worker rank {rank} (pid {proc.pid}) died unexpectedly "
                f"({exit_reason(proc.exitcode)})")

    @staticmethod
    def _failed(rank: int, tb: str) -> str:
        return f"tensor-parallel worker rank {rank} failed:\n{tb.rstrip()}"

    def _stop_workers(self):
        if self._finalizer is not None:
            self._finalizer()  # runs _stop once
