"""Structured outputs: JSON schema, JSON object, regex, choice, grammar and structural-tag constraints
applied as token masks in the sampler (docs/structured_outputs.md)."""
from herd.engine.sampling_params import GuidedDecodingParams, StructuredOutputsParams
from herd.structured_output.backends import StructuredOutputError
from herd.structured_output.config import StructuredOutputsConfig
from herd.structured_output.manager import StructuredOutputManager, StructuredOutputRequest

__all__ = ["GuidedDecodingParams", "StructuredOutputError", "StructuredOutputManager", "StructuredOutputRequest",
           "StructuredOutputsConfig", "StructuredOutputsParams"]
