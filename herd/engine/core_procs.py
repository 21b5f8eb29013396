"""EngineCoreProcs: the engine core processes of a split server, started and stopped.

This module imports no torch: `herd serve` starts the processes first thing, and each imports
torch and the engine while the server resolves its flags and builds the config (both take
seconds), instead of one after the other. Then the config goes to them over their pipes.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import zmq

# Exit status of a process that spawn started and that was re-running the launcher's unguarded
# main script (the same as herd.parallel.mp_executor's tensor-parallel workers use).
SPAWN_REIMPORT_EXIT = 86


@dataclass
class CoreInfo:
    """What an API server needs to reach one engine core (picklable: API server processes get it)."""
    index: int
    pid: int
    input_addr: str
    num_blocks: dict[str, int]


@dataclass
class CoreGroup:
    """The engine cores of a server and the output address of each API server."""
    cores: list[CoreInfo]
    client_addrs: list[str]
    block_size: int
    procs: list = field(default_factory=list, repr=False)   # in the launcher only

    def __getstate__(self):
        state = dict(self.__dict__)
        state["procs"] = []  # processes stay with the launcher
        return state


def _stop_cores(procs, conns, ipc_dir: str, state: dict, timeout: float = 30.0):
    if state["ready"]:
        for conn in conns:
            try:
                conn.send("shutdown")
            except (OSError, ValueError):
                pass
        from herd.parallel.mp_executor import join_or_kill

        join_or_kill(procs, timeout, kill_wait_s=5.0)
    else:
        # still importing, waiting for a config or loading its model (minutes for a large one): a
        # core reads its pipe only once it is ready, so Ctrl-C during start-up would wait out the
        # timeout. Nothing is in flight yet: kill it (its tensor-parallel workers see the pipe close).
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.join(5.0)
    for conn in conns:
        conn.close()
    shutil.rmtree(ipc_dir, ignore_errors=True)


class EngineCoreDied(RuntimeError):
    """An engine core process ended while loading its model without saying why (killed, e.g. for
    memory, or crashed in native code): `herd serve` reports it in one line."""


class SplitUnavailable(RuntimeError):
    """Engine core processes cannot run here (no ipc:// transport, or a process that could not
    even start, e.g. a main module that re-runs the server when spawn imports it). `herd serve`
    then runs the engine in process unless the split was asked for."""


def _engine_core_main(index: int, conn) -> None:
    """An engine core process. It starts before the launcher has a config and imports torch, the
    engine and the tokenizer's modules (seconds) while the launcher resolves its flags; then it
    gets ("config", config, input address, output addresses, devices), or "shutdown", and runs
    the engine core. It exits without the interpreter's teardown, which takes about a second once
    torch is loaded and would delay every shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the launcher stops us
    conn.send(("started",))  # the launcher can tell a process that never ran from a failed engine
    from transformers import AutoTokenizer  # noqa: F401 (what the engine's tokenizer loads)

    from herd.engine.core import run_engine_core

    try:
        msg = conn.recv()
    except (EOFError, OSError):  # the launcher is gone
        os._exit(0)
    if not isinstance(msg, tuple) or msg[0] != "config":
        os._exit(0)
    _, config, input_addr, output_addrs, devices = msg
    try:
        run_engine_core(config, index, input_addr, output_addrs, conn, devices)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _ipc_dir() -> str:
    """A private 0700 folder for the ipc:// sockets, short enough for a socket path (~107 bytes on
    Linux): in $TMPDIR, else in /tmp."""
    for parent in (None, "/tmp"):
        if parent is not None and not os.path.isdir(parent):
            continue
        path = tempfile.mkdtemp(prefix="herd-ipc-", dir=parent)
        if len(path) + len("/client-000") < 100:
            return path
        os.rmdir(path)
    raise SplitUnavailable(f"the temporary folder {tempfile.gettempdir()!r} is too long a path for ipc:// sockets")


class EngineCoreProcs:
    """`dp_size` engine core processes (spawn) for `num_clients` API servers. They start at once
    and import while the caller builds the config; start(config) hands it to them, wait_ready()
    waits until each has loaded its model and raises the error of one that could not (ValueError
    etc. as the engine raised it; SplitUnavailable for a process that never ran), after stopping
    the others. shutdown() (or collecting this object) stops them."""

    def __init__(self, dp_size: int = 1, num_clients: int = 1):
        if getattr(mp.current_process(), "_inheriting", False):
            # this is a new process of ours importing a main script without the `__main__` guard:
            # end it quietly (the launcher says what happened) instead of starting a server here
            raise SystemExit(SPAWN_REIMPORT_EXIT)
        if dp_size < 1 or num_clients < 1:
            raise ValueError("--data-parallel-size and --api-server-count must be >= 1")
        if not zmq.has("ipc"):
            raise SplitUnavailable("this ZeroMQ build has no ipc:// transport")
        self.ipc_dir = _ipc_dir()
        self.client_addrs = [f"ipc://{self.ipc_dir}/client-{j}" for j in range(num_clients)]
        self.addrs = [f"ipc://{self.ipc_dir}/core-{i}" for i in range(dp_size)]
        self.procs, self.conns = [], []
        self.group: CoreGroup | None = None
        self._config = None
        self._state = {"ready": False}
        self._finalizer = weakref.finalize(self, _stop_cores, self.procs, self.conns, self.ipc_dir, self._state)
        ctx = mp.get_context("spawn")
        try:
            for i in range(dp_size):
                parent, child = ctx.Pipe()
                # not a daemon: an engine core may start tensor-parallel worker processes of its own
                proc = ctx.Process(target=_engine_core_main, name=f"herd-engine-core-{i}", args=(i, child))
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
        except BaseException:
            self.shutdown()
            raise

    def start(self, config) -> None:
        """Hand the EngineConfig to the processes."""
        try:
            devices = self._device_slices(config, len(self.procs))
        except BaseException:
            self.shutdown()
            raise
        self._config = config
        for i, conn in enumerate(self.conns):
            try:
                conn.send(("config", config, self.addrs[i], self.client_addrs, devices[i]))
            except (OSError, ValueError):  # it died: wait_ready says how
                pass

    @staticmethod
    def _device_slices(config, dp_size: int) -> list[str | None]:
        if config.device != "cuda" or dp_size == 1:
            return [None] * dp_size
        import torch

        from herd.config import cuda_visible_devices
        tp = config.parallel.tensor_parallel_size
        ids = cuda_visible_devices() or [str(i) for i in range(torch.cuda.device_count())]
        if len(ids) < dp_size * tp:
            raise ValueError(f"--data-parallel-size {dp_size} x --tensor-parallel-size {tp} needs {dp_size * tp} "
                             f"GPUs; {len(ids)} are visible")
        return [",".join(ids[i * tp:(i + 1) * tp]) for i in range(dp_size)]

    def wait_ready(self) -> CoreGroup:
        """Wait until every core has loaded its model (raises its error if one could not)."""
        if self.group is None:
            try:
                infos = [self._wait_ready(i, addr) for i, addr in enumerate(self.addrs)]
            except BaseException:
                self.shutdown()
                raise
            self.group = CoreGroup(infos, self.client_addrs, self._config.cache.block_size, self.procs)
            self._state["ready"] = True
        return self.group

    def _wait_ready(self, i: int, addr: str) -> CoreInfo:
        proc, conn = self.procs[i], self.conns[i]
        started = False
        while True:
            wait([conn, proc.sentinel])
            try:
                msg = conn.recv() if conn.poll() else None
            except (EOFError, OSError):  # the process is gone
                msg = None
            if msg is None:
                from herd.parallel.mp_executor import exit_reason

                proc.join(5.0)
                what = f"engine core {i} (pid {proc.pid})"
                if not started:
                    hint = ("; a script that starts herd needs the `if __name__ == \"__main__\":` guard"
                            if proc.exitcode == SPAWN_REIMPORT_EXIT else "")
                    raise SplitUnavailable(f"{what} could not start ({exit_reason(proc.exitcode)}){hint}")
                oom = "; the system may have run out of memory" if proc.exitcode == -signal.SIGKILL else ""
                raise EngineCoreDied(f"{what} died while starting ({exit_reason(proc.exitcode)}){oom}")
            if msg[0] != "started":
                break
            started = True
        if msg[0] == "error":
            _, kind, message = msg
            klass = {"ValueError": ValueError, "TypeError": TypeError, "FileNotFoundError": FileNotFoundError,
                     "NotImplementedError": NotImplementedError}.get(kind, RuntimeError)
            raise klass(message)
        info = msg[1]
        return CoreInfo(i, info["pid"], addr, info["num_blocks"])

    def shutdown(self):
        self._finalizer()
