"""Per-request image state, the slices of it one engine step needs, and the encoder-output cache.

An image occupies a placeholder span of the prompt (<|image_start|> ... <|image_end|>); its
<|patch|> positions receive the encoder's feature rows in order. Chunked prefill may cover only part
of a span in a step, so a step asks for rows [r0, r1) of the image's features and the runner keeps
the encoder output until the span's last chunk has run.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


def hash_pixel_values(pixel_values: torch.Tensor) -> str:
    """Content hash of preprocessed pixels (what the encoder sees): sha256 hex."""
    t = pixel_values.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
    h.update(raw.numpy().tobytes())
    return h.hexdigest()


@dataclass
class MultiModalItem:
    """One image of a prompt."""
    pixel_values: torch.Tensor     # [tiles, 3, S, S] on the CPU (global tile last when tiles > 1)
    aspect_ratio: tuple[int, int]
    offset: int                    # prompt position of the span's first token (<|image_start|>)
    is_embed: torch.Tensor         # bool [span length]: True at <|patch|> positions
    hash: str = ""
    embed_cumsum: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if not self.hash:
            self.hash = hash_pixel_values(self.pixel_values)
        self.embed_cumsum = torch.cat([torch.zeros(1, dtype=torch.long), self.is_embed.long().cumsum(0)])

    @property
    def length(self) -> int:
        return int(self.is_embed.numel())

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def num_embeds(self) -> int:
        return int(self.embed_cumsum[-1])


@dataclass
class MultiModalSlice:
    """The rows of one image that one sequence's tokens need in one step (picklable)."""
    key: str                       # image hash: the encoder cache key
    pixel_values: torch.Tensor     # the whole image, encoded when the cache misses
    rows: tuple[int, int]          # feature rows [r0, r1)
    dest: list[int]                # offsets inside the sequence's step tokens, one per row
    last: bool                     # the step reaches the end of the span: the cache entry may go


@dataclass
class MultiModalInputs:
    """The images of one prompt, shared by the n sequences of a request."""
    items: list[MultiModalItem]

    def __len__(self) -> int:
        return len(self.items)

    def extra_keys(self, start: int, end: int) -> tuple[str, ...]:
        """Hashes of the images whose spans overlap positions [start, end): a KV block holding
        image tokens is only reusable by prompts with the same images."""
        return tuple(it.hash for it in self.items if it.offset < end and start < it.end)

    def slices(self, start: int, num_tokens: int) -> list[MultiModalSlice]:
        """What a step computing positions [start, start + num_tokens) needs."""
        end = start + num_tokens
        out = []
        for it in self.items:
            lo, hi = max(start, it.offset), min(end, it.end)
            if lo >= hi:
                continue
            mask = it.is_embed[lo - it.offset:hi - it.offset]
            r0, r1 = int(it.embed_cumsum[lo - it.offset]), int(it.embed_cumsum[hi - it.offset])
            dest = (torch.nonzero(mask).flatten() + (lo - start)).tolist()
            out.append(MultiModalSlice(it.hash, it.pixel_values, (r0, r1), dest, hi == it.end))
        return out

    def validate(self, prompt_token_ids: list[int], patch_token_id: int):
        """Check that the spans fit the prompt and their embed positions hold <|patch|> tokens."""
        ids = torch.tensor(prompt_token_ids)
        prev_end = 0
        for i, it in enumerate(self.items):
            if it.offset < prev_end or it.end > len(prompt_token_ids):
                raise ValueError(f"image {i}: span [{it.offset}, {it.end}) is outside the prompt or overlaps "
                                 "the previous image")
            is_patch = ids[it.offset:it.end] == patch_token_id
            if not torch.equal(is_patch, it.is_embed):
                raise ValueError(f"image {i}: the prompt's <|patch|> tokens do not match the image layout")
            prev_end = it.end


class EncoderCache:
    """Projected image features by image hash, kept while a prefill still needs them.

    Entries are dropped when the step that reaches the end of an image's span has run. The LRU bound
    only guards against requests aborted mid-image; an evicted entry is simply recomputed.
    """

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_encoded = 0  # images run through the encoder (for tests and metrics)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        feats = self._entries.get(key)
        if feats is not None:
            self._entries.move_to_end(key)
        return feats

    def put(self, key: str, feats: torch.Tensor):
        self._entries[key] = feats
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def release(self, key: str):
        self._entries.pop(key, None)

    def clear(self):
        self._entries.clear()


def multimodal_embeddings(model, input_ids: torch.Tensor, seq_slices: list[list[MultiModalSlice] | None],
                          query_start_loc: list[int], cache: EncoderCache) -> torch.Tensor | None:
    """Input embeddings for a flattened batch with image features written at <|patch|> positions;
    None when no sequence in the step touches an image (the model then embeds the ids itself)."""
    todo = [(qs, s) for qs, slices in zip(query_start_loc, seq_slices) if slices for s in slices]
    if not todo:
        return None
    feats: dict[str, torch.Tensor] = {}
    missing: dict[str, torch.Tensor] = {}
    for _, s in todo:
        if s.key in feats or s.key in missing:
            continue
        hit = cache.get(s.key)
        if hit is not None:
            feats[s.key] = hit
        elif s.rows[1] > s.rows[0]:
            missing[s.key] = s.pixel_values
    if missing:
        device = input_ids.device
        encoded = model.get_multimodal_embeddings([pv.to(device) for pv in missing.values()])
        cache.num_encoded += len(missing)
        for key, f in zip(missing, encoded):
            feats[key] = f
            cache.put(key, f)
    embeds = model.get_input_embeddings(input_ids)
    for qs, s in todo:
        if s.rows[1] > s.rows[0]:
            idx = torch.tensor(s.dest, dtype=torch.long, device=embeds.device) + qs
            embeds[idx] = feats[s.key][s.rows[0]:s.rows[1]].to(embeds.dtype)
    for _, s in todo:
        if s.last:
            cache.release(s.key)
    return embeds
