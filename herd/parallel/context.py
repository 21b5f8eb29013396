"""Tensor-parallel context handed to every layer that shards (no global process-group state).

`group` is a torch.distributed backend process group (gloo or NCCL) built by
herd.parallel.distributed without touching torch's default group, so several engines can live in
one process. Collectives call the group's own methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPContext:
    rank: int = 0
    size: int = 1
    group: Any = None  # ProcessGroupGloo / ProcessGroupNCCL when size > 1

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) over ranks; in place when x is contiguous (the result is returned either way)."""
        if self.size == 1:
            return x
        if not x.is_contiguous():
            x = x.contiguous()
        if op == "sum":
            self.group.allreduce([x]).wait()
        else:
            import torch.distributed as dist
            opts = dist.AllreduceOptions()
            opts.reduceOp = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
            self.group.allreduce([x], opts).wait()
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    def shard(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={self.size}")
        return n // self.size


SINGLE = TPContext()
