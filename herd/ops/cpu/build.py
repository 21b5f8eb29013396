"""Compile herd's C kernels with the system compiler on first use, and load them with ctypes.

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

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n) for n in ("gemm.c", "attention.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


def kernel_cache_dir() -> str:
    root = os.environ.get("HERD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "herd")
    return os.path.join(root, "kernels")


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


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(so), "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(so, out)  # atomic: other processes building the same key see one whole file


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built here (no compiler, not Linux/x86
    or ARM with a GCC-compatible compiler, a failed build: logged once)."""
    cc = _compiler()
    if cc is None or platform.system() != "Linux":
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([*(p.read_text() for p in SOURCES), " ".join(FLAGS), version, platform.machine(),
                                        _cpu_flags()]).encode()).hexdigest()[:16]
        path = Path(kernel_cache_dir()) / f"herd_cpu_{key}.so"
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("herd CPU kernels unavailable (%s); using torch kernels", detail.strip().splitlines()[-1:] or e)
        return None
    fn = lib.herd_grouped_gemm_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64, i64, ptr, i64, ptr, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.herd_linear_f32
    fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.herd_paged_decode_f32
    fn.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64,
                   ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib
