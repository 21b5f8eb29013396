"""Process groups for tensor parallelism, built without torch.distributed's global default group.

Rank 0 hosts a TCPStore; every rank builds a gloo (CPU) or NCCL (CUDA) group from it. The
timeout bounds how long a collective waits for a peer that stopped participating; a peer whose
process died is reported at once by gloo (its sockets close).
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch.distributed as dist

from herd.parallel.context import TPContext


@dataclass(frozen=True)
class DistInit:
    """How the ranks of one engine find each other (picklable, sent to every worker)."""
    host: str
    port: int
    world_size: int
    backend: str            # gloo | nccl
    timeout_s: float = 120.0


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def local_ip() -> str:
    """An address other nodes can reach (for multi-node Ray); loopback when there is no route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def serve_store(host: str, world_size: int, timeout_s: float):
    """Rank 0's store on a port the OS picks (no race for a "free" port); returns (store, port)."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; tensor parallelism needs it")
    store = dist.TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return store, store.port


class TPGroup:
    """One rank's membership: the store (rank 0 serves it) and the backend group."""

    def __init__(self, init: DistInit, rank: int, device=None, store=None):
        timeout = datetime.timedelta(seconds=init.timeout_s)
        self.rank, self.world_size, self.backend = rank, init.world_size, init.backend
        self.store = store or dist.TCPStore(init.host, init.port, init.world_size, rank == 0, timeout=timeout)
        if init.backend == "gloo":
            self.group = dist.ProcessGroupGloo(self.store, rank, init.world_size, timeout)
        elif init.backend == "nccl":
            if not dist.is_nccl_available():
                raise RuntimeError("the NCCL backend is not available in this torch build")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.group = dist.ProcessGroupNCCL(self.store, rank, init.world_size, opts)
            connect = getattr(self.group, "eager_connect_single_device", None)
            if device is not None and connect is not None:  # set up the communicator on this GPU now
                connect(device)
        else:
            raise ValueError(f"unknown torch.distributed backend {init.backend!r} (gloo or nccl)")

    def context(self) -> TPContext:
        return TPContext(rank=self.rank, size=self.world_size, group=self.group)

    def abort(self):
        """Release this rank's side. NCCL: abort the communicator so a blocked collective returns.
        Gloo has no such switch; its peers notice when a process exits (the sockets close)."""
        group, self.group = self.group, None
        if group is not None and self.backend == "nccl":
            try:
                group.abort()
            except RuntimeError:
                pass
