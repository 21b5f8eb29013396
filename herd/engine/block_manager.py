"""Paged KV blocks with prefix caching, for two KV groups.

"full" holds the NoPE (global attention) layers: a sequence keeps every block.
"local" holds the chunked-attention RoPE layers: blocks entirely left of the chunk of the next token
to compute are never read again, so they are released as the sequence advances (table entry -1).

Prefix caching: a full block is identified by a chained hash (parent hash, its tokens, extra keys such
as image hashes). Released blocks keep their hash and sit in an LRU free list until reused, so a later
request with the same prefix can take them back.
"""
from __future__ import annotations

from collections import OrderedDict

from herd.engine.sequence import Sequence

FULL, LOCAL = "full", "local"


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        bid, _ = self.free.popitem(last=False)  # least recently released first
        h = self.block_hash[bid]
        if h is not None:
            if self.cached.get(h) == bid:
                del self.cached[h]
            self.block_hash[bid] = None
        self.ref_cnt[bid] = 1
        return bid

    def lookup(self, h: int) -> int | None:
        return self.cached.get(h)

    def touch(self, bid: int):
        if self.ref_cnt[bid] == 0:
            del self.free[bid]
        self.ref_cnt[bid] += 1

    def release(self, bid: int):
        self.ref_cnt[bid] -= 1
        if self.ref_cnt[bid] == 0:
            self.free[bid] = None

    def register(self, bid: int, h: int):
        if self.block_hash[bid] is None and h not in self.cached:
            self.cached[h] = bid
            self.block_hash[bid] = h

    def reset_cache(self):
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks


class BlockManager:
    def __init__(self, block_size: int, num_blocks: dict[str, int], chunk_size: int | None,
                 enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.chunk_size = chunk_size if LOCAL in num_blocks else None
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = {g: BlockPool(n) for g, n in num_blocks.items()}

    # -- accounting -------------------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        return list(self.pools)

    def usage(self) -> float:
        total = sum(p.num_blocks for p in self.pools.values())
        return 1.0 - sum(p.num_free for p in self.pools.values()) / max(total, 1)

    def num_free_blocks(self) -> dict[str, int]:
        return {g: p.num_free for g, p in self.pools.items()}

    def max_chunk_tokens(self, seq: Sequence, num_new_tokens: int) -> int:
        """The most of `num_new_tokens` (from seq.num_computed_tokens on) this sequence could ever
        compute in one step: what its allocation would need must fit in each whole pool, counting
        the blocks the sequence already holds. Local blocks left of the step's first chunk are not
        needed (allocate_slots neither keeps nor allocates them), so the local group bounds the
        table at first_needed_block(computed) + its pool size. A chunk capped this way waits only
        for blocks other sequences hold, never for blocks that do not exist."""
        c = seq.num_computed_tokens
        limit = c + num_new_tokens
        for g, pool in self.pools.items():
            if g == LOCAL:
                max_table = self.first_needed_block(c) + pool.num_blocks
            else:
                max_table = pool.num_blocks
            limit = min(limit, max_table * self.block_size)
        return max(0, limit - c)

    def min_blocks_to_progress(self, max_model_len: int, chunked_prefill: bool = True) -> dict[str, int]:
        """Blocks each group needs so that one sequence of max_model_len, alone, always progresses.

        full: every block of the sequence. local with chunked prefill: the scheduler caps each step
        at max_chunk_tokens, so a step only needs the blocks of its chunk window up to its first new
        token: up to chunk_size - 1 tokens (plus a block of misalignment when chunk_size is not a
        multiple of block_size) before it, hence ceil(chunk_size / block_size) + 1. local without
        chunked prefill: a (recomputed) sequence of up to max_model_len - 1 tokens is one step, and
        that step holds every local block it writes, as full does."""
        n = -(-max_model_len // self.block_size)
        out = {FULL: n} if FULL in self.pools else {}
        if LOCAL in self.pools:
            out[LOCAL] = min(n, -(-self.chunk_size // self.block_size) + 1) if chunked_prefill else n
        return out

    def first_needed_block(self, pos: int) -> int:
        """First local block a query at `pos` (or later) can read."""
        return (pos // self.chunk_size) * self.chunk_size // self.block_size

    # -- prefix caching ---------------------------------------------------------------------
    def _hashes(self, seq: Sequence, n_blocks: int, extra_key=None) -> list[int]:
        bs = self.block_size
        hashes = seq.block_hashes
        tokens = seq.all_token_ids
        while len(hashes) < n_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else hash(("herd", extra_key))
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            # blocks holding image tokens also key on the images' content hashes
            block_extra = seq.block_extra_keys(i * bs, (i + 1) * bs)
            hashes.append(hash(key + (block_extra,) if block_extra else key))
        return hashes[:n_blocks]

    def get_computed_blocks(self, seq: Sequence, extra_key=None) -> int:
        """Attach cached blocks for the longest cached prefix; return its length in tokens.
        At least one token is always left to compute so the step produces logits."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hashes = self._hashes(seq, max_blocks, extra_key)
        hits: dict[str, list[int]] = {g: [] for g in self.pools}
        k = 0
        if FULL in self.pools:
            for h in hashes:
                bid = self.pools[FULL].lookup(h)
                if bid is None:
                    break
                hits[FULL].append(bid)
                k += 1
        else:
            k = max_blocks
        if LOCAL in self.pools:
            while k > 0:
                lo = self.first_needed_block(k * bs)
                found = [self.pools[LOCAL].lookup(h) for h in hashes[lo:k]]
                if all(b is not None for b in found):
                    hits[LOCAL] = [-1] * lo + found
                    break
                k -= 1
        if k == 0:
            return 0
        for g, pool in self.pools.items():
            table = hits[g][:k]
            for bid in table:
                if bid >= 0:
                    pool.touch(bid)
            seq.block_tables[g] = table
        seq.num_computed_tokens = seq.num_cached_tokens = k * bs
        return k * bs

    def cache_blocks(self, seq: Sequence, old_computed: int, new_computed: int, extra_key=None):
        """Register blocks completed by this step so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        lo, hi = old_computed // bs, new_computed // bs
        if hi <= lo:
            return
        hashes = self._hashes(seq, hi, extra_key)
        for g, pool in self.pools.items():
            table = seq.block_tables.get(g, [])
            for i in range(lo, hi):
                if i < len(table) and table[i] >= 0:
                    pool.register(table[i], hashes[i])

    # -- allocation -------------------------------------------------------------------------
    def release_out_of_chunk(self, seq: Sequence):
        if LOCAL not in self.pools:
            return
        table = seq.block_tables.get(LOCAL, [])
        hi = min(self.first_needed_block(seq.num_computed_tokens), len(table))
        if hi == 0 or table[hi - 1] < 0:  # released entries always form a prefix: nothing new
            return
        pool = self.pools[LOCAL]
        for i in range(hi):
            if table[i] >= 0:
                pool.release(table[i])
                table[i] = -1

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for positions [num_computed, num_computed + num_new_tokens). False = out of blocks."""
        self.release_out_of_chunk(seq)
        need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        tables = seq.block_tables
        if len(tables) == len(self.pools) and all(len(t) >= need for t in tables.values()):
            return True  # a decode inside its last block: nothing to allocate
        want = {g: max(0, need - len(seq.block_tables.get(g, []))) for g in self.pools}
        if LOCAL in want:  # blocks below the first one the step reads are never allocated
            have = len(seq.block_tables.get(LOCAL, []))
            skip = max(0, self.first_needed_block(seq.num_computed_tokens) - have)
            want[LOCAL] = max(0, want[LOCAL] - skip)
        if any(self.pools[g].num_free < n for g, n in want.items()):
            return False
        for g, pool in self.pools.items():
            table = seq.block_tables.setdefault(g, [])
            if g == LOCAL:
                while len(table) < min(need, self.first_needed_block(seq.num_computed_tokens)):
                    table.append(-1)
            while len(table) < need:
                table.append(pool.allocate())
        return True

    def free(self, seq: Sequence):
        for g, pool in self.pools.items():
            for bid in reversed(seq.block_tables.get(g, [])):  # tail blocks are evicted first
                if bid >= 0:
                    pool.release(bid)
        seq.block_tables = {}

    def reset_prefix_cache(self):
        for pool in self.pools.values():
            pool.reset_cache()
