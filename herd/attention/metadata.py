"""What the model's forward receives about the batch's attention: device tensors plus a few host
integers, all computed once per step by the runner and the backend's builder (never per layer)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class KVGroupMetadata:
    block_tables: torch.Tensor   # [B, W] int32, -1 where unallocated or freed
    slot_mapping: torch.Tensor   # [T] int64 flat slot (block * block_size + offset); -1 = don't store


@dataclass
class CommonAttentionMetadata:
    """The flattened batch: sequence b owns query rows query_start_loc[b]:query_start_loc[b+1].
    Decodes (one query) come first: sequences [0, num_decodes) and rows [0, num_decodes)."""
    query_start_loc: torch.Tensor        # [B+1] int32 on the device
    seq_lens: torch.Tensor               # [B] int32: context length after this step
    groups: dict[str, KVGroupMetadata]
    query_start_loc_cpu: np.ndarray      # host copies, for builders and the reference backend
    seq_lens_cpu: np.ndarray
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @classmethod
    def from_host(cls, query_start_loc, seq_lens, block_tables: dict[str, torch.Tensor],
                  slot_mapping: dict[str, torch.Tensor], block_size: int, device=None):
        """Build from host lists (tests, calibration); decodes need not come first here unless the
        backend asks for it (the reference backend does not)."""
        qsl = np.asarray(query_start_loc, dtype=np.int32)
        sl = np.asarray(seq_lens, dtype=np.int32)
        qlens = np.diff(qsl)
        nd = int(np.argmax(qlens != 1)) if (qlens != 1).any() else len(qlens)
        device = device or next(iter(block_tables.values())).device
        groups = {g: KVGroupMetadata(block_tables[g].to(device), slot_mapping[g].to(device)) for g in block_tables}
        return cls(torch.from_numpy(qsl).to(device), torch.from_numpy(sl).to(device), groups, qsl, sl, nd,
                   int(qlens.max(initial=0)), int(sl.max(initial=0)), block_size)


@dataclass
class AttentionMetadata:
    impl: object                         # the backend's AttentionImpl
    common: CommonAttentionMetadata
    per_group: dict[str, object]         # the backend's own metadata per KV group
    kv_caches: list | None = None        # per layer: (k_cache, v_cache)
    kv_scales: list | None = None        # per layer (k_scale, v_scale) floats for fp8 caches

    @property
    def block_size(self) -> int:
        return self.common.block_size


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1): decode windows are padded to these widths."""
    return 1 << max(0, (n - 1).bit_length())


def group_chunks(model) -> dict[str, int | None]:
    """KV group -> attention chunk of its layers (None: global)."""
    return {layer.self_attn.attn.group: layer.self_attn.attn.chunk for layer in model.model.layers}


def make_metadata(backend, common: CommonAttentionMetadata, chunks: dict[str, int | None], kv_caches,
                  kv_scales=None) -> AttentionMetadata:
    return AttentionMetadata(backend, common, backend.build(common, chunks), kv_caches, kv_scales)
