"""Accelerator catalog: datasheet memory, bandwidth and dense peak FLOP/s per device.

Figures are vendor datasheet numbers for one card (dense, i.e. without 2:4 sparsity); sources are
listed in docs/plan.md. HBM is built from binary-sized stacks, so the "80 GB" of an H100 or the
"128 GB" of a Gaudi 3 is read as GiB; runtimes report within ~1% of that.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class DeviceSpec:
    key: str                  # --device name
    name: str
    memory_gib: float         # HBM capacity per card
    memory_type: str
    bandwidth_tbps: float     # HBM bandwidth, TB/s (10^12 B/s)
    bf16_tflops: float        # dense BF16 matmul peak
    fp8_tflops: float | None  # dense FP8 matmul peak; None: no FP8 math (FP8 weights run as W8A16)
    fp8_format: str | None    # FP8 E4M3 variant the matmul units take
    fp8_max: float | None     # largest finite value of that format
    cards_per_node: int = 8

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_tbps * 1e12

    def peak_flops(self, fp8: bool) -> float:
        """Peak FLOP/s for a matmul whose weights are FP8 (`fp8`) or BF16/INT4-dequantized."""
        if fp8 and self.fp8_tflops is not None:
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12

    def describe(self) -> str:
        fp8 = (f"{self.fp8_tflops:g} TFLOP/s fp8 ({self.fp8_format}, max {self.fp8_max:g})"
               if self.fp8_tflops else "no fp8 matmul (fp8 weights run weight-only)")
        return (f"{self.name}: {self.memory_gib:g} GiB {self.memory_type}, "
                f"{self.bandwidth_tbps:g} TB/s, {self.bf16_tflops:g} TFLOP/s bf16, {fp8}")


def catalog() -> tuple[DeviceSpec, ...]:
    D = DeviceSpec
    return (
        D("gaudi2", "Intel Gaudi 2", 96, "HBM2E", 2.45, 432, 865, "E4M3", 240),
        D("gaudi3", "Intel Gaudi 3", 128, "HBM2E", 3.7, 1835, 1835, "E4M3FN", 448),
        D("h100", "NVIDIA H100 SXM 80GB", 80, "HBM3", 3.35, 989, 1979, "E4M3FN", 448),
        D("h200", "NVIDIA H200 SXM 141GB", 141, "HBM3e", 4.8, 989, 1979, "E4M3FN", 448),
        D("b200", "NVIDIA B200", 180, "HBM3e", 8.0, 2250, 4500, "E4M3FN", 448),
        D("a100", "NVIDIA A100 SXM 80GB", 80, "HBM2e", 2.039, 312, None, None, None),
        D("mi300x", "AMD Instinct MI300X", 192, "HBM3", 5.3, 1307.4, 2614.9, "E4M3FNUZ", 240),
        D("mi325x", "AMD Instinct MI325X", 256, "HBM3E", 6.0, 1307.4, 2614.9, "E4M3FNUZ", 240),
    )


def device_names() -> list[str]:
    return [d.key for d in catalog()]


def get_device(name: str) -> DeviceSpec:
    """Look up a device by catalog key; case, spaces, '-' and '_' are ignored ("Gaudi-3" works)."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    key = {"h100sxm": "h100", "h200sxm": "h200", "b200sxm": "b200"}.get(key, key)
    for d in catalog():
        if d.key == key:
            return d
    raise ValueError(f"unknown device {name!r}; known devices: {', '.join(device_names())}")
