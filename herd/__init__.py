"""herd: inference and serving for Llama 4 mixture-of-experts models."""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # Lazy so that `import herd` (and `herd plan`) do not load the engine.
    if name == "LLM":
        from herd.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from herd.engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
