"""The wire format between API servers and engine core processes: msgpack, no pickle.

msgpack (C implementation, already locked) packs the per-step token outputs in a few microseconds
per request, and decoding runs no code from the peer: every message is plain lists, numbers,
strings and bytes, rebuilt into herd's own objects here. SamplingParams travel as their constructor
arguments; image tensors as raw bytes with dtype and shape.

front end -> core:  ["add", client, request_id, prompt_token_ids, params, arrival_time, images | None]
                    ["abort", [request_id, ...]]
                    ["finish", request_id, sequence index, stop string]   (a stop string ended it)
core -> front end:  ["out", core, [output, ...], stats]
                    ["err", core, request_id, error kind, message, param]
                    ["stats", core, stats]
                    ["dead", core, message]
"""
from __future__ import annotations

import dataclasses
import enum
import json

import msgpack
import torch

from herd.engine.exceptions import EngineDeadError, EngineStepError
from herd.engine.output_processor import EngineCoreOutput, SeqOutput
from herd.engine.outputs import Logprob, RequestMetrics
from herd.engine.sampling_params import SamplingParams, SamplingParamsError
from herd.multimodal.inputs import MultiModalInputs, MultiModalItem


def _default(obj):
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__} to an engine core process")


def packb(obj) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpackb(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# -- requests ------------------------------------------------------------------------------------

def encode_params(params: SamplingParams) -> dict:
    """The constructor arguments of `params` (what the caller set; the engine core fills the rest)."""
    out = {}
    for f in dataclasses.fields(params):
        if not f.init or f.name == "guided_decoding":  # guided_decoding is structured_outputs
            continue
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
            if isinstance(value.get("json"), (dict, bool)):  # a schema as JSON text: msgpack has no big ints
                value["json"] = json.dumps(value["json"])
        out[f.name] = value
    return out


def pack_request(request_id: str, client: int, token_ids: list[int], params: SamplingParams,
                 arrival_time: float, mm: MultiModalInputs | None) -> bytes:
    """An "add" message. Raises ValueError naming a parameter that cannot cross a process
    boundary (e.g. a Python callable)."""
    wire = encode_params(params)
    try:
        return packb(["add", client, request_id, token_ids, wire, arrival_time, encode_mm(mm)])
    except (TypeError, ValueError, OverflowError) as e:
        bad = [k for k, v in wire.items() if not _packable(v)]
        raise ValueError(f"sampling parameter(s) {bad} cannot be sent to the engine core process ({e}); "
                         "serve with --disable-frontend-multiprocessing to use them") from None


def _packable(value) -> bool:
    try:
        packb(value)
        return True
    except (TypeError, ValueError, OverflowError):
        return False


def decode_params(data: dict) -> SamplingParams:
    return SamplingParams(**data)


def _tensor(t: torch.Tensor) -> list:
    t = t.detach().to("cpu").contiguous()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()]


def _untensor(data: list) -> torch.Tensor:
    dtype, shape, raw = data
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape(shape)


def encode_mm(mm: MultiModalInputs | None) -> list | None:
    if mm is None:
        return None
    return [[_tensor(it.pixel_values), list(it.aspect_ratio), it.offset, _tensor(it.is_embed), it.hash]
            for it in mm.items]


def decode_mm(data: list | None) -> MultiModalInputs | None:
    if data is None:
        return None
    return MultiModalInputs([MultiModalItem(_untensor(px), tuple(ar), offset, _untensor(emb), h)
                             for px, ar, offset, emb, h in data])


# -- errors --------------------------------------------------------------------------------------

_ERRORS = {"SamplingParamsError": SamplingParamsError, "ValueError": ValueError, "TypeError": TypeError,
           "NotImplementedError": NotImplementedError, "EngineStepError": EngineStepError,
           "EngineDeadError": EngineDeadError}


def encode_error(exc: BaseException) -> list:
    """[kind, message, param] of an exception a request failed with."""
    kind = type(exc).__name__
    if isinstance(exc, SamplingParamsError):
        kind = "SamplingParamsError"
    elif isinstance(exc, ValueError):
        kind = "ValueError"
    elif kind not in _ERRORS:
        kind = "RuntimeError"
    return [kind, str(exc), getattr(exc, "parameter", None)]


def decode_error(kind: str, message: str, param) -> BaseException:
    if kind == "SamplingParamsError":
        return SamplingParamsError(message, param)
    return _ERRORS.get(kind, RuntimeError)(message)


# -- outputs -------------------------------------------------------------------------------------

def _enc_logprobs(positions: list | None) -> list | None:
    """[{token: Logprob}] -> [[token, logprob, rank, token, logprob, rank, ...] or None]."""
    if positions is None:
        return None
    out = []
    for d in positions:
        if d is None:
            out.append(None)
            continue
        flat = []
        for t, lp in d.items():
            flat += (t, lp.logprob, lp.rank)
        out.append(flat)
    return out


def _dec_logprobs(data: list | None) -> list | None:
    if data is None:
        return None
    return [None if flat is None else {flat[k]: Logprob(flat[k + 1], flat[k + 2]) for k in range(0, len(flat), 3)}
            for flat in data]


def encode_output(o: EngineCoreOutput) -> list:
    seqs = [[s.index, s.new_token_ids, _enc_logprobs(s.new_logprobs), s.cumulative_logprob, s.finish_reason,
             s.stop_reason, s.stop_terminated] for s in o.seqs]
    metrics = dataclasses.astuple(o.metrics) if o.metrics is not None else None
    return [o.request_id, seqs, _enc_logprobs(o.new_prompt_logprobs), metrics, o.num_cached_tokens, o.finished]


def decode_output(data: list) -> EngineCoreOutput:
    rid, seqs, plp, metrics, cached, finished = data
    return EngineCoreOutput(
        rid, [SeqOutput(i, toks, _dec_logprobs(lps), cum, reason, stop, term)
              for i, toks, lps, cum, reason, stop, term in seqs],
        _dec_logprobs(plp), RequestMetrics(*metrics) if metrics is not None else None, cached, finished)


def encode_stats(stats) -> dict:
    return dataclasses.asdict(stats)


def merge_stats(stats_class, all_stats: list[dict]):
    """Engine stats of several engine cores (data parallel) as one: counts and counters add up,
    KV-cache usage is the mean, per-group block counts add up per group."""
    merged: dict = {}
    for s in all_stats:
        for k, v in s.items():
            if k not in merged:
                merged[k] = dict(v) if isinstance(v, dict) else v
            elif isinstance(v, dict):
                for g, n in v.items():
                    merged[k][g] = merged[k].get(g, 0) + n
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                merged[k] += v
    if all_stats and "kv_cache_usage" in merged:
        merged["kv_cache_usage"] /= len(all_stats)
    names = {f.name for f in dataclasses.fields(stats_class)}
    return stats_class(**{k: v for k, v in merged.items() if k in names})
