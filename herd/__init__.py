"""herd: inference and serving for Llama 4 mixture-of-experts models."""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutputKind", "RequestOutput", "CompletionOutput",
           "TextPrompt", "TokensPrompt", "EngineArgs", "AsyncEngineArgs", "AsyncLLMEngine", "LLMEngine",
           "__version__"]

# name -> module; imported on first use so that `import herd` (and `herd plan`) do not load the engine.
_LAZY = {
    "LLM": "herd.engine.llm",
    "SamplingParams": "herd.engine.sampling_params",
    "BeamSearchParams": "herd.engine.sampling_params",
    "RequestOutputKind": "herd.engine.sampling_params",
    "RequestOutput": "herd.engine.outputs",
    "CompletionOutput": "herd.engine.outputs",
    "TextPrompt": "herd.inputs",
    "TokensPrompt": "herd.inputs",
    "EngineArgs": "herd.engine.arg_utils",
    "AsyncEngineArgs": "herd.engine.arg_utils",
    "AsyncLLMEngine": "herd.engine.async_engine",
    "LLMEngine": "herd.engine.llm_engine",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'herd' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__():
    return sorted(__all__)
