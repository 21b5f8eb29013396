"""One tensor-parallel rank: its process group, ModelRunner (weights sliced at load) and KV cache.

The driver (rank 0) runs a Worker inside the engine process; the other ranks run one each in a
worker process (`worker_main`, multiprocessing) or a Ray actor. Every rank runs the same forward
for each step, so the collectives inside the model line up; only the driver samples.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
import traceback

import torch
from tqdm import tqdm

from herd.config import EngineConfig
from herd.parallel.distributed import DistInit, TPGroup


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """Rank r uses cuda:r when the engine device is plain "cuda" (the ModelRunner's rule)."""
    if config.device == "cuda":
        return torch.device(f"cuda:{rank}")
    return torch.device(config.device)


class Worker:
    def __init__(self, config: EngineConfig, rank: int, init: DistInit, store=None):
        self.config, self.rank, self.init = config, rank, init
        self.store = store          # rank 0 may bring the TCPStore it already serves
        self.group: TPGroup | None = None
        self.runner = None

    def init_distributed(self):
        device = rank_device(self.config, self.rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.group = TPGroup(self.init, self.rank, device if device.type == "cuda" else None, self.store)

    def load_model(self):
        from herd.engine.runner import ModelRunner
        from herd.quant.methods import build_quant_methods
        tp = self.group.context()
        self.runner = ModelRunner(self.config, tp=tp, quant=build_quant_methods(self.config, tp))

    def determine_num_blocks(self) -> dict[str, int]:
        return self.runner.determine_num_blocks()

    def allocate_kv_cache(self, num_blocks: dict[str, int]):
        self.runner.allocate_kv_cache(num_blocks)

    def execute_model(self, inp):
        self.runner.execute_model(inp)

    def finish(self) -> list:
        return self.runner.finish() if self.runner is not None else []

    def shutdown(self):
        if self.group is not None:
            self.group.abort()


def worker_main(config: EngineConfig, rank: int, init: DistInit, conn):
    """Entry point of a worker process: serve (method, args, wants_reply) messages until told to
    stop or the engine's end of the pipe closes. Any error is sent back, then the process exits
    non-zero, which closes its sockets so the other ranks' collectives fail at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine process's to handle
    # Progress bars here need no cross-process semaphore (one would leak if this process is killed).
    tqdm.set_lock(threading.RLock())
    worker = Worker(config, rank, init)
    try:
        conn.send(("ok", os.getpid()))
        while True:
            try:
                method, args, reply = pickle.loads(conn.recv_bytes())
            except EOFError:  # the engine process is gone
                break
            if method == "shutdown":
                break
            result = getattr(worker, method)(*args)
            if reply:
                conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - everything is reported, then the process exits
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)
    worker.shutdown()
    conn.close()
