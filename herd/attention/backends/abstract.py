"""The interface every attention backend implements."""
from __future__ import annotations

from herd.attention.metadata import AttentionMetadata, CommonAttentionMetadata


class AttentionBackend:
    """`build` runs once per step (host work, small device copies); `forward` runs per layer and
    must not read device values back to the host (no .item(), .tolist(), bool(tensor))."""

    name = "abstract"
    # A decode step's forward can be traced by torch.compile (no host reads).
    supports_graphs = False
    # ... and recorded as a CUDA graph: it reads only device tensors whose addresses stay fixed,
    # and the host values its plan holds depend on the batch size alone (for_graph=True).
    supports_cuda_graphs = False

    def build(self, common: CommonAttentionMetadata, chunks: dict[str, int | None],
              for_graph: bool = False) -> dict[str, object]:
        """Per KV group: whatever forward needs. `chunks` maps a group to its attention chunk
        (None for global layers). for_graph: a padded decode-only batch whose host integers must
        stay fixed for the bucket."""
        raise NotImplementedError

    def mark_window_dynamic(self, plan) -> None:
        """Compiled decode: mark (torch._dynamo.maybe_mark_dynamic) the dims of one group's plan
        that grow with the KV window, so a batch size compiles once however long its sequences
        get. Nothing by default (a plan whose shapes depend on the batch size alone)."""

    def forward(self, layer, q, k, v, positions, meta: AttentionMetadata):
        """layer: the model's Attention op (layer_idx, group, chunk, scale, head counts).
        q [T, H, d], k/v [T, Hkv, d] -> [T, H, d]."""
        raise NotImplementedError

    def layer_cache(self, layer, meta: AttentionMetadata):
        k_cache, v_cache = meta.kv_caches[layer.layer_idx]
        k_scale, v_scale = meta.kv_scales[layer.layer_idx] if meta.kv_scales else (1.0, 1.0)
        return k_cache, v_cache, k_scale, v_scale
