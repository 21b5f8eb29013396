"""Torch backend without host reads in the forward (default on CPU): per step, each KV group's
decode windows (block ids and masks) and prefill gathers are planned once and shared by all the
group's layers; each layer then does one batched SDPA for every decode plus one per prefill."""
from herd.attention.backends.sdpa.backend import SdpaAttentionBackend

__all__ = ["SdpaAttentionBackend"]
