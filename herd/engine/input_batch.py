"""The runner's persistent batch: each live sequence's tokens and block tables in preallocated numpy
buffers, updated from the scheduler's per-step diffs; a step's model inputs are built from them with
vectorized numpy (no per-token Python loop).

With async scheduling a row's newest token may be a placeholder (negative in `token_ids`): its value
is the runner's last sample for the row, on the device; the step names where it goes
(placeholder_idx) and the runner gathers it there."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from herd.engine.protocol import NO_TOKEN, SchedulerOutput


@dataclass
class StepInputs:
    """One step's flattened batch on the host, decodes first."""
    perm: np.ndarray                      # step row i is the scheduler's sequence perm[i]
    rows: np.ndarray                      # buffer rows in step order
    num_scheduled: np.ndarray             # [B] int64
    query_start_loc: np.ndarray           # [B+1] int32
    seq_lens: np.ndarray                  # [B] int32
    input_ids: np.ndarray                 # [T] int64
    positions: np.ndarray                 # [T] int64
    slot_mapping: dict[str, np.ndarray]   # [T] int64
    block_tables: dict[str, np.ndarray]   # [B, W] int32
    num_decodes: int
    sample_idx: np.ndarray                # step rows whose last token samples
    prompt_logprob_rows: list             # (step row, first query row, count, first position)
    placeholder_idx: np.ndarray           # [P] tokens whose id is the row's last sample (on the device)
    placeholder_rows: np.ndarray          # [P] their buffer rows


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int, groups: list[str]):
        R, self.block_size = max_num_seqs, block_size
        max_blocks = -(-max_model_len // block_size)
        self.token_ids = np.zeros((R, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(R, dtype=np.int64)
        self.num_computed = np.zeros(R, dtype=np.int64)
        self.num_prompt = np.zeros(R, dtype=np.int64)
        self.prompt_logprobs = np.zeros(R, dtype=bool)
        self.tables = {g: np.full((R, max_blocks), -1, dtype=np.int32) for g in groups}
        self.table_lens = {g: np.zeros(R, dtype=np.int64) for g in groups}
        self.row_of: dict[int, int] = {}
        self.free_rows = list(range(R - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.row_of)

    def update(self, out: SchedulerOutput):
        for sid in out.finished_seq_ids:
            row = self.row_of.pop(sid, None)
            if row is not None:
                self.free_rows.append(row)
        for s in out.new_seqs:
            if not self.free_rows:
                raise RuntimeError("more live sequences than max_num_seqs")
            row = self.free_rows.pop()
            self.row_of[s.seq_id] = row
            n = len(s.token_ids)
            self.token_ids[row, :n] = s.token_ids
            self.num_tokens[row], self.num_prompt[row] = n, s.num_prompt_tokens
            self.num_computed[row] = s.num_computed_tokens
            self.prompt_logprobs[row] = s.prompt_logprobs
            for g, tab in self.tables.items():
                t = s.block_tables.get(g, [])
                tab[row, :len(t)] = t
                self.table_lens[g][row] = len(t)
        c = out.cached
        if not len(c.seq_ids):
            return
        rows = np.fromiter((self.row_of[int(s)] for s in c.seq_ids), dtype=np.int64, count=len(c.seq_ids))
        got = c.new_token_ids != NO_TOKEN  # a sampled token, or PLACEHOLDER (kept negative)
        r = rows[got]
        self.token_ids[r, self.num_tokens[r]] = c.new_token_ids[got]
        self.num_tokens[r] += 1
        for g, (idx, ids) in c.new_blocks.items():
            idx = idx.astype(np.int64)
            rr = rows[idx]
            # idx is grouped by sequence: the k-th new block of a row goes k places past its end
            k = np.arange(len(idx)) - np.searchsorted(idx, idx, side="left")
            self.tables[g][rr, self.table_lens[g][rr] + k] = ids
            np.add.at(self.table_lens[g], rr, 1)
        for g, (idx, cnt) in c.freed.items():
            for j, n in zip(idx.tolist(), cnt.tolist()):
                self.tables[g][rows[j], :n] = -1

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        rows = np.fromiter((self.row_of[int(s)] for s in out.order), dtype=np.int64, count=len(out.order))
        n = out.num_scheduled_tokens.astype(np.int64)
        perm = np.argsort(n != 1, kind="stable")   # decodes (one query) first
        rows, n = rows[perm], n[perm]
        B = len(rows)
        start = self.num_computed[rows]
        qsl = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(n, out=qsl[1:])
        T = int(qsl[-1])
        seq_of_tok = np.repeat(np.arange(B), n)
        positions = np.arange(T, dtype=np.int64) - qsl[:-1][seq_of_tok] + start[seq_of_tok]
        tok_rows = rows[seq_of_tok]
        if (start + n > self.num_tokens[rows]).any():
            raise RuntimeError("a step schedules tokens the runner does not have")
        input_ids = self.token_ids[tok_rows, positions].astype(np.int64)
        ph = np.flatnonzero(input_ids < 0)
        if len(ph):
            # only a row's newest token can be one its last step is still sampling
            if (positions[ph] != self.num_tokens[tok_rows[ph]] - 1).any():
                raise RuntimeError("a step schedules tokens the runner does not have")
            input_ids[ph] = 0
        slots, tables = {}, {}
        for g, tab in self.tables.items():
            blk = tab[tok_rows, positions // bs].astype(np.int64)
            if (blk < 0).any():
                raise RuntimeError(f"a token of this step has no KV block in group {g!r}")
            slots[g] = blk * bs + positions % bs
            width = int(self.table_lens[g][rows].max(initial=1))
            tables[g] = tab[rows, :max(width, 1)]
        seq_lens = (start + n).astype(np.int32)
        num_decodes = int((n == 1).sum())
        sample_idx = np.nonzero(start + n == self.num_tokens[rows])[0]
        plp = []
        for i in np.nonzero(self.prompt_logprobs[rows] & (start < self.num_prompt[rows] - 1))[0].tolist():
            end = min(int(start[i] + n[i]), int(self.num_prompt[rows[i]]) - 1)
            plp.append((i, int(qsl[i]), end - int(start[i]), int(start[i])))
        self.num_computed[rows] += n
        return StepInputs(perm, rows, n, qsl.astype(np.int32), seq_lens, input_ids, positions, slots, tables,
                          num_decodes, sample_idx, plp, ph, tok_rows[ph])
