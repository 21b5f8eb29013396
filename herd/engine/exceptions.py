"""Errors the engine hands to callers, whichever process the engine core runs in."""
from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine (its thread, or an engine core process) has stopped; nothing more will run."""


class EngineStepError(RuntimeError):
    """The step running this request raised; the request was aborted, the engine lives on."""
