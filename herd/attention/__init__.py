"""Attention backends: a metadata builder and an implementation per backend, chosen once at start-up
(herd.attention.selector). The model's Attention op calls `meta.impl.forward(...)`."""
