"""herd's INC scales and node names against numbers recorded once from Intel Neural Compressor.

tests/data/inc_reference.json was written by running neural-compressor-pt 3.10 on the CPU (outside
this repository, not a dependency): its op quantizers (`ops_quantizer.get_op_quantizer(...)
.get_scales_module_config()`) on the measurement set and weights below, with device_for_scales set
to Gaudi2 / Gaudi3, and its `should_quantize` over module trees shaped like vLLM-HPU's tiny Llama 4
and Llama models with INC's HPU patched-module table. The OPT methods need the HPU fp8 cast; they
were recorded with that one op emulated on the CPU (saturate to the device's range, round to
nearest e4m3fn), everything else is INC's code. Only numbers and names are stored.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from herd.quant.formats import ScaleDevice
from herd.quant.inc import IncQuantConfig, Measurements, NodeStats, compute_scales

REFERENCE = Path(__file__).parent / "data" / "inc_reference.json"


def reference_weight(rows: int, cols: int, amps: list[float], dtype: str) -> torch.Tensor:
    """Deterministic weight (no RNG): row i is amps[i % len(amps)] times a fixed pattern in [-1, 1]
    that reaches -1 and +1 in every row when cols >= 17."""
    i = torch.arange(rows)[:, None]
    j = torch.arange(cols)[None, :]
    base = ((i * 7 + j * 13) % 17 - 8).double() / 8
    amp = torch.tensor([amps[k % len(amps)] for k in range(rows)], dtype=torch.float64)[:, None]
    return (base * amp).to(getattr(torch, dtype))


def reference_measurements(ref: dict) -> tuple[Measurements, dict[str, torch.Tensor], dict[str, str]]:
    nodes, weights, classes = {}, {}, {}
    for name, e in ref["measurements"].items():
        w = e.get("weight")
        if w is not None:
            weights[name] = reference_weight(w["rows"], w["cols"], w["amps"], w["dtype"])
        nodes[name] = NodeStats(list(e["inputs"]), list(e["outputs"]) if e.get("outputs") is not None else None,
                                e.get("weight_amax"))
        classes[name] = e["class"]
    return Measurements(nodes, local_rank=0), weights, classes


def _load():
    return json.loads(REFERENCE.read_text())


def _as_list(v):
    return [float(x) for x in (v if isinstance(v, list) else [v])]


CASES = sorted(_load()["scales"])


@pytest.mark.parametrize("case", CASES)
def test_scales_equal_inc(case):
    """Every input, output and weight scale herd computes equals INC's, bit for bit."""
    ref = _load()
    meas, weights, classes = reference_measurements(ref)
    method, device = case.split("/")
    cfg = IncQuantConfig.from_dict({"scale_method": method, "device_for_scales": device})
    got = compute_scales(meas, cfg, device=ScaleDevice.parse(device), weights=weights, node_classes=classes,
                         fill_cold=False).nodes
    want = ref["scales"][case]
    assert set(got) == set(want)
    bad = []
    for name, w in want.items():
        g = got[name]
        pairs = [("inputs", [float(x) for x in g.inputs], [float(x) for x in w["inputs"]])]
        pairs.append(("outputs", [x for o in g.outputs for x in _as_list(torch.as_tensor(o).tolist())],
                      [x for o in w["outputs"] for x in _as_list(o)]))
        if "weight" in w:
            pairs.append(("weight", _as_list(torch.as_tensor(g.weight).tolist()), _as_list(w["weight"])))
        if "weight_in" in w:   # INC's in-channel scale: recorded as {"ones": n} when it is all ones
            want_in = w["weight_in"]
            want_in = [1.0] * want_in["ones"] if isinstance(want_in, dict) else _as_list(want_in)
            pairs.append(("weight_in", _as_list(torch.as_tensor(g.weight_in).tolist()), want_in))
        bad += [f"{name}.{k}: herd {a} INC {b}" for k, a, b in pairs if a != b]
    assert not bad, f"{len(bad)} differences, e.g. " + "; ".join(bad[:4])


def test_reference_covers_the_rounding_edges():
    """The set would catch float64 rounding: for some nodes the exact ratio lies just above a power
    of two, and INC (bf16) keeps that power where float64 takes the next one."""
    ref = _load()
    hw = ref["scales"]["maxabs_hw/GAUDI3"]
    meas, weights, _ = reference_measurements(ref)
    rounded_down = 0
    for name, e in hw.items():
        if "weight" in e and not isinstance(e["weight"], list) and name in weights:
            exact = float(weights[name].double().abs().max()) / 224
            rounded_down += e["weight"] < exact
    assert rounded_down >= 2
