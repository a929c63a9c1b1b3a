"""The machine line every measurement is printed with: CPU model, cores, memory, OS, the SIMD /
AMX flags that decide which kernels run, and the read bandwidth measured now (the floor of a
decode step that reads every weight once). bench/ prints the same line (bench.common)."""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from runtime.host_cpu import cpu_flags, cpu_model

# the /proc/cpuinfo flags that pick ONNX Runtime's and OpenVINO's CPU kernels
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "asimd", "sve")


def read_bandwidth(gib: float = 2.0, repeats: int = 5) -> float:
    """Bytes/s for a streaming read on every core at once (as ORT's threads read weights), of
    an array larger than the last-level cache; best of N. numpy's sum releases the GIL."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(a, os.cpu_count() or 1)
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def simd_flags(flags: frozenset[str] | None = None) -> list[str]:
    flags = cpu_flags() if flags is None else flags
    return [f for f in SIMD_FLAGS if f in (flags or ())]


def machine() -> str:
    """CPU model, cores, RAM and OS."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def machine_line(bandwidth: float | None = None, gib: float = 0.5) -> str:
    """'machine: <CPU, cores, RAM, OS>; <flags>; read bandwidth N GB/s'; the bandwidth is
    measured (over `gib` GiB) unless given."""
    bandwidth = read_bandwidth(gib, repeats=3) if bandwidth is None else bandwidth
    return (f"machine: {machine()}; {', '.join(simd_flags()) or 'no AVX2/AVX-512/AMX flags'}; "
            f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
