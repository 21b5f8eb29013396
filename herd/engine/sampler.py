"""Sampler: one next token per logits row, in vLLM V1's order.

structured outputs grammar bitmask -> raw logprobs (if asked) -> allowed_token_ids -> bad_words
-> min_tokens -> logit_bias -> logits_processors -> penalties (repetition, frequency, presence)
-> greedy argmax, or for random rows: temperature -> min_p -> top-k -> top-p -> exponential race (Gumbel-max with per-row
generators). As in vLLM the grammar mask comes first, so logprobs of constrained rows are those of
the masked logits.

Tensor work is batched over rows; Python loops only build index lists and draw seeded noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from herd.engine.outputs import Logprob
from herd.engine.sampling_params import SAMPLING_EPS, SamplingParams, bad_words_index

# Rows per block when computing prompt logprobs, so a long prompt never makes a [T, V] fp32 copy.
_PROMPT_LOGPROBS_CHUNK = 512


@dataclass
class SamplingRow:
    """What the sampler needs to know about the request behind one logits row."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # set for seeded requests, on the logits' device
    eos_token_ids: set[int] = field(default_factory=set)
    # output tokens before this sample when output_token_ids may lag (async scheduling counts the
    # tokens still being sampled); None: len(output_token_ids)
    num_output_tokens: int | None = None

    @property
    def num_outputs(self) -> int:
        return len(self.output_token_ids) if self.num_output_tokens is None else self.num_output_tokens


@dataclass
class SamplerOutput:
    sampled_token_ids: list[int]
    # Per row: token id -> Logprob (sampled token first, then the top-N), or None when the row did
    # not ask for logprobs. The whole field is None when no row asked. decoded_token is left None.
    logprobs: list[dict[int, Logprob] | None] | None = None
    sampled: torch.Tensor | None = None   # the same ids on the logits' device (fed to the next step)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Per-request generator: seeded rows draw only from it, so batch neighbours do not matter."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class Sampler:
    """Call as sampler(logits[N, V], rows). Logits are float32 and may be modified in place."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"expected logits [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}")
        logits = logits.float()
        grammar_rows = [i for i, r in enumerate(rows) if r.params.structured_output_request is not None]
        kept = apply_grammar_bitmask(logits, rows, grammar_rows) if grammar_rows else None
        # vLLM V1 default (raw_logprobs): logprobs come from the model's logits, before processing.
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None

        apply_allowed_token_ids(logits, rows)
        apply_bad_words(logits, rows)
        apply_min_tokens(logits, rows)
        apply_logit_bias(logits, rows)
        apply_logits_processors(logits, rows)
        apply_penalties(logits, rows)
        if kept is not None:
            restore_dead_grammar_rows(logits, *kept)
        sampled = sample(logits, rows)

        logprobs = None
        if lp_rows:
            vocab = logits.shape[1]
            nums = [rows[i].params.num_logprobs(vocab) for i in lp_rows]
            dicts = gather_logprobs(raw_logprobs, sampled[lp_rows], nums)
            logprobs = [None] * len(rows)
            for i, d in zip(lp_rows, dicts):
                logprobs[i] = d
        return SamplerOutput(sampled_token_ids=sampled.tolist(), logprobs=logprobs, sampled=sampled)


# ---- structured outputs -----------------------------------------------------------------------

def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [k, W] (bit t % 32 of word t // 32 = token t allowed) -> bool [k, vocab]."""
    bits = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int32, device=bitmask.device),
                                    torch.arange(32, dtype=torch.int32, device=bitmask.device))
    allowed = (bitmask.unsqueeze(-1) & bits) != 0
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab]


def apply_grammar_bitmask(logits: torch.Tensor, rows: list[SamplingRow], picked: list[int]):
    """-inf for every token the row's grammar does not allow next. Returns what
    restore_dead_grammar_rows needs when a later processor could ban the grammar's last tokens."""
    masks = torch.stack([rows[i].params.structured_output_request.take_bitmask() for i in picked])
    allowed = unpack_bitmask(masks.to(logits.device), logits.shape[1])
    if allowed.shape[1] < logits.shape[1]:  # logits wider than the grammar's vocabulary
        allowed = torch.nn.functional.pad(allowed, (0, logits.shape[1] - allowed.shape[1]), value=False)
    idx = torch.tensor(picked, dtype=torch.long, device=logits.device)
    masked = logits[idx].masked_fill_(~allowed, float("-inf"))
    logits[idx] = masked
    # allowed_token_ids, bad_words and min_tokens can remove every token the grammar allows, and a
    # logits processor may also bring banned ones back: such rows are checked after the processors.
    if any(rows[i].params.allowed_token_ids is not None or rows[i].params.bad_words_token_ids
           or rows[i].params.logits_processors or rows[i].num_outputs < rows[i].params.min_tokens
           for i in picked):
        return idx, masked, allowed
    return None


def restore_dead_grammar_rows(logits: torch.Tensor, idx: torch.Tensor, masked: torch.Tensor,
                              allowed: torch.Tensor) -> None:
    """Mask again; a row left with no token falls back to the grammar alone (the constraint wins),
    so it never samples from all -inf."""
    x = logits[idx].masked_fill_(~allowed, float("-inf"))
    dead = torch.isneginf(x).all(dim=-1)
    logits[idx] = torch.where(dead.unsqueeze(1), masked, x)


# ---- logits processors (in place on logits [N, V]) ---------------------------------------------

def _index(rows: list[int], cols: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(cols, dtype=torch.long, device=device))


def apply_allowed_token_ids(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    picked = [i for i, r in enumerate(rows) if r.params.allowed_token_ids is not None]
    if not picked:
        return
    vocab = logits.shape[1]
    r_idx, c_idx = [], []
    for j, i in enumerate(picked):
        ids = [t for t in rows[i].params.allowed_token_ids if 0 <= t < vocab]
        r_idx += [j] * len(ids)
        c_idx += ids
    banned = torch.ones(len(picked), vocab, dtype=torch.bool, device=logits.device)
    banned[_index(r_idx, c_idx, logits.device)] = False
    picked_t = torch.tensor(picked, dtype=torch.long, device=logits.device)
    logits[picked_t] = logits[picked_t].masked_fill(banned, float("-inf"))


def _ban(logits: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    vocab = logits.shape[1]
    pairs = [(r, c) for r, c in pairs if 0 <= c < vocab]
    if pairs:
        r_idx, c_idx = zip(*pairs)
        logits[_index(list(r_idx), list(c_idx), logits.device)] = float("-inf")


def apply_bad_words(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Ban the last token of a bad word when the output already ends with the rest of it."""
    r_idx: list[int] = []
    c_idx: list[int] = []
    for i, r in enumerate(rows):
        index = r.params.bad_words_index
        if index is None:
            if r.params.bad_words_token_ids:  # params tokenized elsewhere: build the index once
                index = r.params.bad_words_index = bad_words_index(r.params.bad_words_token_ids)
            else:
                continue
        # one dict look-up per distinct prefix length, not one comparison per bad word
        out = r.output_token_ids
        for length, by_prefix in index.items():
            if len(out) >= length:
                last = by_prefix.get(tuple(out[len(out) - length:]))
                if last:
                    r_idx += [i] * len(last)
                    c_idx += last
    if r_idx:
        r_t, c_t = _index(r_idx, c_idx, logits.device)
        keep = (c_t >= 0) & (c_t < logits.shape[1])
        logits[r_t[keep], c_t[keep]] = float("-inf")



def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Until min_tokens are out, forbid EOS and stop tokens (even with ignore_eos, as vLLM)."""
    pairs = []
    for i, r in enumerate(rows):
        if r.num_outputs < r.params.min_tokens:
            stop_ids = set(r.eos_token_ids) | r.params.all_stop_token_ids | set(r.params.stop_token_ids)
            pairs += [(i, t) for t in stop_ids]
    _ban(logits, pairs)


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    r_idx, c_idx, values = [], [], []
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        for tok, bias in (r.params.logit_bias or {}).items():
            if 0 <= tok < vocab:
                r_idx.append(i)
                c_idx.append(tok)
                values.append(bias)
    if r_idx:
        vals = torch.tensor(values, dtype=logits.dtype, device=logits.device)
        logits.index_put_(_index(r_idx, c_idx, logits.device), vals, accumulate=True)


def apply_logits_processors(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """SamplingParams.logits_processors, per row: fn(output_ids, logits) or fn(prompt_ids,
    output_ids, logits) with the row's [vocab] logits; a returned tensor replaces them."""
    for i, r in enumerate(rows):
        for fn in r.params.logits_processors or ():
            args = (tuple(r.output_token_ids), logits[i])
            if _num_params(fn) == 3:
                args = (tuple(r.prompt_token_ids),) + args
            out = fn(*args)
            if out is not None:
                logits[i] = out


def _num_params(fn) -> int:
    import inspect

    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature: the two-argument form
        return 2


def _token_counts(seqs: list[list[int]], vocab: int, device) -> torch.Tensor:
    """[len(seqs), vocab] occurrence counts; out-of-range ids land in a dropped extra column."""
    width = max((len(s) for s in seqs), default=0)
    if width == 0:
        return torch.zeros(len(seqs), vocab, device=device)
    padded = torch.tensor([s + [vocab] * (width - len(s)) for s in seqs], dtype=torch.long,
                          device=device).clamp_(0, vocab)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """vLLM/OpenAI semantics: repetition over prompt + output, presence/frequency over output."""
    picked = [i for i, r in enumerate(rows)
              if r.params.repetition_penalty != 1.0 or r.params.presence_penalty != 0.0
              or r.params.frequency_penalty != 0.0]
    if not picked:
        return
    dev, vocab = logits.device, logits.shape[1]
    params = [rows[i].params for i in picked]

    def column(values):
        return torch.tensor(values, dtype=logits.dtype, device=dev).unsqueeze(1)

    out_counts = _token_counts([rows[i].output_token_ids for i in picked], vocab, dev)
    prompt_seen = _token_counts([rows[i].prompt_token_ids for i in picked], vocab, dev) > 0
    out_seen = out_counts > 0
    picked_t = torch.tensor(picked, dtype=torch.long, device=dev)
    x = logits[picked_t]
    rep = torch.where(prompt_seen | out_seen, column([p.repetition_penalty for p in params]), 1.0)
    # Shrinks positive logits and pushes negative ones further down.
    x = torch.where(x > 0, x / rep, x * rep)
    x -= column([p.frequency_penalty for p in params]) * out_counts
    x -= column([p.presence_penalty for p in params]) * out_seen
    logits[picked_t] = x


# ---- sampling ----------------------------------------------------------------------------------

def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability."""
    probs = x.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return x.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(x: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """k: per-row top-k (0 = off); p: per-row top-p (1.0 = off). Ties with the k-th logit stay."""
    if p is None:
        # top-k alone needs only the k-th largest value per row, not a full sort.
        top = x.topk(int(k.max()), dim=-1).values
        kth = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
        kth = torch.where((k > 0).unsqueeze(1), kth, float("-inf"))
        return x.masked_fill(x < kth, float("-inf"))
    sorted_x, order = x.sort(dim=-1, descending=True)
    if k is not None:
        kth = sorted_x.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
        kth = torch.where((k > 0).unsqueeze(1), kth, float("-inf"))
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep the smallest prefix reaching p; rows with p == 1 are untouched (cumsum rounding).
    drop = (mass_before >= p.unsqueeze(1)) & (p < 1.0).unsqueeze(1)
    drop[:, 0] = False
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the largest float32 logit, ties going to the lowest token id on every
    device and backend (not left to how a reduction kernel happens to split the row). Rows with a
    tie (rare) are resolved exactly; a row holding NaN keeps torch.argmax's pick (a NaN)."""
    x = logits.float()
    out = x.argmax(dim=-1)
    top = x.gather(1, out.unsqueeze(1))
    tied = ((x == top).sum(dim=-1) > 1).nonzero().squeeze(1)
    if tied.numel():
        sub = x[tied]
        ids = torch.arange(x.shape[-1], device=x.device)
        out[tied] = torch.where(sub == top[tied], ids, x.shape[-1]).amin(dim=-1)
    return out


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Greedy rows take the argmax; random rows race probs / Exponential(1) noise."""
    dev, vocab = logits.device, logits.shape[1]
    random_rows = [i for i, r in enumerate(rows) if not r.params.temperature < SAMPLING_EPS]
    if len(random_rows) < len(rows):
        out = greedy_argmax(logits)
        if not random_rows:
            return out
    else:
        out = torch.empty(len(rows), dtype=torch.long, device=dev)
    params = [rows[i].params for i in random_rows]
    idx = torch.tensor(random_rows, dtype=torch.long, device=dev)
    x = logits[idx]
    x.div_(torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev).unsqueeze(1))
    if any(p.min_p > 0 for p in params):
        x = apply_min_p(x, torch.tensor([p.min_p for p in params], dtype=x.dtype, device=dev))
    use_k = any(p.top_k > 0 for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if use_k or use_p:
        k = (torch.tensor([min(max(p.top_k, 0), vocab) for p in params], device=dev)
             if use_k else None)
        p_ = torch.tensor([p.top_p for p in params], dtype=x.dtype, device=dev) if use_p else None
        x = apply_top_k_top_p(x, k, p_)
    probs = x.softmax(dim=-1)
    noise = torch.empty_like(probs)
    seeded = [(j, rows[i].generator) for j, i in enumerate(random_rows) if rows[i].generator is not None]
    if len(seeded) < len(random_rows):
        noise.exponential_()
    for j, gen in seeded:
        noise[j].exponential_(generator=gen)
    # A zero draw would turn a masked token's 0 / 0 into NaN, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    out[idx] = probs.div_(noise).argmax(dim=-1)
    return out


# ---- logprobs ----------------------------------------------------------------------------------

def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    num_logprobs: list[int]) -> list[dict[int, Logprob]]:
    """Per row: the given token's logprob and rank, plus the top num_logprobs[i] tokens.

    Rank = 1 + number of tokens with a strictly greater logprob; the top-N get ranks 1..N.
    """
    token_ids = token_ids.to(logprobs.device, torch.long)
    token_lp = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > token_lp).sum(dim=-1) + 1
    top_n = max(num_logprobs, default=0)
    if top_n > 0:
        top_lp, top_ids = logprobs.topk(top_n, dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    token_lp, ranks, token_ids = token_lp.squeeze(1).tolist(), ranks.tolist(), token_ids.tolist()
    result = []
    for i, n in enumerate(num_logprobs):
        d = {token_ids[i]: Logprob(token_lp[i], ranks[i])}
        for j in range(n):
            d.setdefault(top_ids[i][j], Logprob(top_lp[i][j], j + 1))
        result.append(d)
    return result


def compute_prompt_logprobs(logits: torch.Tensor, next_token_ids, num_logprobs: int
                            ) -> list[dict[int, Logprob]]:
    """Logprobs of each next prompt token given logits[T, V] of the positions before it.

    For a whole prompt pass logits of positions 0..L-2 and prompt[1:]; the request's
    prompt_logprobs is then [None] + this list. num_logprobs = -1 means the whole vocab.
    """
    next_token_ids = torch.as_tensor(next_token_ids, dtype=torch.long)
    if logits.shape[0] != next_token_ids.shape[0]:
        raise ValueError(f"got {logits.shape[0]} logits rows for {next_token_ids.shape[0]} tokens")
    n = logits.shape[1] if num_logprobs == -1 else num_logprobs
    result = []
    for start in range(0, logits.shape[0], _PROMPT_LOGPROBS_CHUNK):
        block = torch.log_softmax(logits[start:start + _PROMPT_LOGPROBS_CHUNK].float(), dim=-1)
        ids = next_token_ids[start:start + _PROMPT_LOGPROBS_CHUNK]
        result += gather_logprobs(block, ids, [n] * block.shape[0])
    return result
