"""vLLM's entry-point module paths, for commands copied from vLLM guides."""
