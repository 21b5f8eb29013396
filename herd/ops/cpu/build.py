"""Compile herd's C kernels with the system compiler on first use (at model load), and load them
with ctypes.

The library is built for this machine (-march=native) and cached under the herd cache
($HERD_CACHE/kernels, else ~/.cache/herd/kernels), keyed by the source, the flags, the compiler
and the CPU's feature flags, so a copied cache never runs code built for another CPU. Without a
working compiler the kernels are simply unavailable and callers use their torch paths.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from herd.hub.herd_cache import herd_cache_dir

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n) for n in ("gemm.c", "attention.c"))
HEADERS = tuple(Path(__file__).with_name(n) for n in ("gemm_body.h", "attention_body.h"))  # part of the key, not compiled alone
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str, out: Path, sources: tuple[Path, ...] = SOURCES) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        subprocess.run([cc, *FLAGS, *map(str, sources), "-o", str(so), "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(so, out)  # atomic: other processes building the same key see one whole file


_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
SIGNATURES = {  # C entry point -> argument types (each returns int: 0, or -1 on a shape it refuses)
    **{f"herd_grouped_gemm_{t}": [_PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT]
       for t in ("f32", "bf16")},
    **{f"herd_linear_{t}": [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _INT] for t in ("f32", "bf16")},
    **{f"herd_gemv_rm_{t}": [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _INT] for t in ("f32", "bf16")},
    "herd_gemv_rm_bf16_max_rows": [],
    **{f"herd_paged_decode_{t}": [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64,
                                  _I64, _I64, _I64, ctypes.c_float, _INT] for t in ("f32", "bf16")},
}


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built here (no C compiler, not Linux, a
    failed build: logged once per process)."""
    cc = _compiler()
    if cc is None or platform.system() != "Linux":
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([*(p.read_text() for p in SOURCES + HEADERS), " ".join(FLAGS), version,
                                        platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
        path = Path(herd_cache_dir("kernels")) / f"herd_cpu_{key}.so"
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        lines = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        logger.warning("herd CPU kernels unavailable (%s); using torch kernels", lines[-1] if lines else type(e).__name__)
        return None
    return _declare(lib)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def build_from(folder: Path, out: Path) -> ctypes.CDLL:
    """The kernels built from the sources in `folder` (files named as SOURCES and HEADERS) into
    `out`, uncached: benchmarks/cpu_kernels_ab.py compares another revision's kernels with these."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    _build(cc, out, tuple(folder / p.name for p in SOURCES))
    return _declare(ctypes.CDLL(str(out)))
