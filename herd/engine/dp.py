"""Data parallel: which engine core (model replica) gets a new request.

Each engine core reports its queue lengths (running and waiting sequences) a few times a second;
between reports the front end adds what it sent itself. A request goes to the core with the
smallest load, waiting * 4 + running as in vLLM (a waiting sequence costs a prefill and delays
everyone behind it), unless its prompt starts with blocks this front end recently sent to one core:
that core holds them in its prefix cache, and it is chosen while its load is within `slack` of the
least loaded one (a cache hit saves a prefill; a hot core should still shed load).
"""
from __future__ import annotations

from collections import OrderedDict


class DPLoadBalancer:
    def __init__(self, num_cores: int, block_size: int, slack: int = 8, max_prefixes: int = 16384):
        self.num_cores = num_cores
        self.block_size = block_size
        self.slack = slack
        self.max_prefixes = max_prefixes
        self.running = [0] * num_cores         # from the last stats of each core
        self.waiting = [0] * num_cores
        self.sent_since_stats = [0] * num_cores  # sequences sent after those stats
        self._prefixes: OrderedDict[int, int] = OrderedDict()   # chained block hash -> core

    def update(self, core: int, num_running: int, num_waiting: int):
        self.running[core], self.waiting[core] = num_running, num_waiting
        self.sent_since_stats[core] = 0

    def load(self, core: int) -> int:
        return 4 * (self.waiting[core] + self.sent_since_stats[core]) + self.running[core]

    def _block_hashes(self, token_ids: list[int]) -> list[int]:
        bs, out, h = self.block_size, [], hash("herd-dp")
        for i in range(len(token_ids) // bs):
            h = hash((h, tuple(token_ids[i * bs:(i + 1) * bs])))
            out.append(h)
        return out

    def choose(self, token_ids: list[int], num_seqs: int = 1) -> int:
        """The core for a request with these prompt tokens (and n = num_seqs); counts it as sent."""
        loads = [self.load(c) for c in range(self.num_cores)]
        best = min(range(self.num_cores), key=lambda c: (loads[c], c))
        hashes = self._block_hashes(token_ids) if self.num_cores > 1 else []
        affine = None
        for h in hashes:  # chained hashes: the first miss ends the shared prefix
            core = self._prefixes.get(h)
            if core is None:
                break
            affine = core
        if affine is not None and loads[affine] <= loads[best] + self.slack:
            best = affine
        for h in hashes:
            self._prefixes[h] = best
            self._prefixes.move_to_end(h)
        while len(self._prefixes) > self.max_prefixes:
            self._prefixes.popitem(last=False)
        self.sent_since_stats[best] += num_seqs
        return best
