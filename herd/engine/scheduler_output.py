"""OutputTracker: turns the scheduler's view of each step into the diffs of herd.engine.protocol,
remembering what every runner already holds."""
from __future__ import annotations

import numpy as np

from herd.engine.protocol import NO_TOKEN, PLACEHOLDER, CachedSeqData, NewSeqData, SchedulerOutput


def _small(a: list[int]) -> np.ndarray:
    """int16 when it fits: token counts are small in decode steps."""
    arr = np.asarray(a, dtype=np.int32)
    return arr.astype(np.int16) if arr.size and arr.max() < 32768 else arr


class _Sent:
    __slots__ = ("num_tokens", "table_lens", "num_freed")

    def __init__(self, num_tokens: int, tables: dict[str, list[int]]):
        self.num_tokens = num_tokens
        self.table_lens = {g: len(t) for g, t in tables.items()}
        self.num_freed = {g: _leading_freed(t) for g, t in tables.items()}


def _leading_freed(table: list[int]) -> int:
    n = 0
    for b in table:
        if b >= 0:
            break
        n += 1
    return n


class OutputTracker:
    """The scheduler side of the diffs: what the runners know of each sequence."""

    def __init__(self):
        self.sent: dict[int, _Sent] = {}
        self.removed: list[int] = []

    def remove(self, seq_id: int):
        if self.sent.pop(seq_id, None) is not None:
            self.removed.append(seq_id)

    def commit(self, out: SchedulerOutput):
        """`out` reached every runner."""
        done = set(out.finished_seq_ids)
        self.removed = [s for s in self.removed if s not in done]

    def build(self, seqs, num_tokens: list[int], starts: list[int] | None = None,
              placeholders: list[int] | None = None) -> SchedulerOutput:
        """`starts`: each sequence's first position this step (default: its computed tokens; later
        when steps before it are still running); `placeholders`: tokens those steps are sampling
        for it (async scheduling; the runner has them on its device)."""
        new, c_ids, c_tok = [], [], []
        c_blocks: dict[str, tuple[list[int], list[int]]] = {}
        c_freed: dict[str, tuple[list[int], list[int]]] = {}
        mm = {}
        for k, (seq, n) in enumerate(zip(seqs, num_tokens)):
            ph = placeholders[k] if placeholders is not None else 0
            sent = self.sent.get(seq.seq_id)
            tables = seq.block_tables
            if sent is None:
                new.append(NewSeqData(seq.seq_id, seq.all_token_ids, seq.num_prompt_tokens, seq.num_computed_tokens,
                                      {g: list(t) for g, t in tables.items()}, seq.params.prompt_logprobs is not None))
                self.sent[seq.seq_id] = _Sent(seq.num_tokens, tables)
            else:
                j = len(c_ids)
                c_ids.append(seq.seq_id)
                total = seq.num_tokens + ph
                if total > sent.num_tokens:  # one sampled token per step
                    if total - sent.num_tokens != 1:
                        raise RuntimeError("more than one new token per step for one sequence")
                    # the newest position: a placeholder while the step sampling it still runs
                    c_tok.append(PLACEHOLDER if ph else seq.output_token_ids[-1])
                    sent.num_tokens = total
                else:
                    c_tok.append(NO_TOKEN)
                for g, t in tables.items():
                    have = sent.table_lens.get(g, 0)
                    if len(t) > have:
                        idx, ids = c_blocks.setdefault(g, ([], []))
                        idx.extend([j] * (len(t) - have))
                        ids.extend(t[have:])
                        sent.table_lens[g] = len(t)
                    lead = sent.num_freed.get(g, 0)
                    while lead < len(t) and t[lead] < 0:
                        lead += 1
                    if lead != sent.num_freed.get(g, 0):
                        idx, cnt = c_freed.setdefault(g, ([], []))
                        idx.append(j)
                        cnt.append(lead)
                        sent.num_freed[g] = lead
            if seq.multi_modal is not None:
                start = starts[k] if starts is not None else seq.num_computed_tokens
                slices = seq.multi_modal.slices(start, n)
                if slices:
                    mm[seq.seq_id] = slices
        cached = CachedSeqData(
            np.asarray(c_ids, dtype=np.int32), np.asarray(c_tok, dtype=np.int32),
            {g: (_small(i), np.asarray(b, dtype=np.int32)) for g, (i, b) in c_blocks.items()},
            {g: (_small(i), _small(c)) for g, (i, c) in c_freed.items()})
        # Removals stay pending until a step that carried them ran (commit): a step that fails
        # before reaching the runners must not lose them.
        removed = list(self.removed)
        order = [s.seq_id for s in seqs]
        # The scheduler puts running (cached) sequences before newly admitted ones: then the order
        # needs no bytes of its own.
        implied = c_ids + [s.seq_id for s in new]
        order_ids = None if order == implied else np.asarray(order, dtype=np.int32)
        return SchedulerOutput(new, cached, order_ids, _small(num_tokens), removed, mm)
