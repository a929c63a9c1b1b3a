"""This machine's memory, and sizes as users write them ("12GB", "800MiB").

`export` and `quantize` estimate their peak resident memory before they load anything and refuse
in one line when it does not fit (exporter/memory_estimate.py, calibration/memory.py), instead
of being killed by the OOM killer half-way. What fits is `available()` (plus what the process
holds already), or less where the user sets a budget with `--max-memory`.

    parse_size("12GB") -> 12_000_000_000        parse_size("1.5GiB") -> 1_610_612_736
    available()        -> bytes a process may still allocate (MemAvailable, within the cgroup's limit)
    check_fits(what, peak, budget)              -> one line of refusal when `peak` does not fit
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from runtime.errors import Blip2EdgeError, OptionError

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]+)")
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: memory.max and memory.current of this process's group


def parse_size(text: str, option: str = "--max-memory") -> int:
    """Bytes of a size such as 12GB, 1.5GiB, 800MB (decimal units KB/MB/GB/TB, binary
    KiB/MiB/GiB/TiB, case-insensitive). A bare number, an unknown unit or zero is refused in one
    line naming `option`."""
    raw = str(text).strip()
    m = _SIZE.fullmatch(raw)
    hint = "write a number and a unit, e.g. 12GB, 1.5GiB or 800MB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
    if m is None:
        if re.fullmatch(r"\d+(\.\d+)?", raw):
            raise OptionError(f"{option} {raw!r}: no unit; {hint}")
        raise OptionError(f"{option} {raw!r}: not a size; {hint}")
    unit = _UNITS.get(m.group(2).upper())
    if unit is None:
        raise OptionError(f"{option} {raw!r}: unknown unit '{m.group(2)}'; {hint}")
    value = int(float(m.group(1)) * unit)
    if value <= 0:
        raise OptionError(f"{option} {raw!r}: must be more than zero")
    return value


def format_size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _meminfo_available(path: Path = MEMINFO) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _psutil_available() -> int | None:
    try:
        import psutil  # optional: where /proc/meminfo is not there (macOS, Windows)
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _cgroup_path(root: Path = CGROUP) -> Path | None:
    """This process's cgroup v2 directory, from /proc/self/cgroup ("0::/path")."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].strip().lstrip("/")
    except OSError:
        return None
    return None


def cgroup_headroom(group: Path | None = None) -> int | None:
    """memory.max minus memory.current of the cgroup (v2), the tightest of it and its parents
    up to the mount point; None where no limit is set or the files cannot be read."""
    group = group if group is not None else _cgroup_path()
    best = None
    while group is not None:
        try:
            limit = (group / "memory.max").read_text().strip()
            current = int((group / "memory.current").read_text().strip())
        except (OSError, ValueError):
            limit = "max"
            current = 0
        if limit != "max":
            try:
                room = max(0, int(limit) - current)
            except ValueError:
                room = None
            if room is not None:
                best = room if best is None else min(best, room)
        if group == CGROUP or group.parent == group or not str(group).startswith(str(CGROUP)):
            break
        group = group.parent
    return best


def available() -> int | None:
    """Bytes a process may still allocate without swapping: MemAvailable (/proc/meminfo, or
    psutil where there is none), within the cgroup's memory.max where one is set. None where
    nothing can be read (no check is made then: the caller says so)."""
    values = [v for v in (_meminfo_available() if MEMINFO.exists() else _psutil_available(), cgroup_headroom())
              if v is not None]
    return min(values) if values else None


def resident() -> int:
    """This process's resident memory now (VmRSS); 0 where /proc is not there."""
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MemoryBudgetError(Blip2EdgeError):
    """The expected peak memory of a run does not fit the memory available or --max-memory."""


AVAILABLE_MARGIN = 1.05  # the estimates are fitted within about 5% (exporter/memory_estimate.py)


def check_fits(what: str, peak: int, max_memory: int | None = None, free: int | None = None,
               held: int | None = None, alternatives: dict[str, int] | None = None, note: str = "") -> str:
    """Refuses (MemoryBudgetError, one line) when the expected `peak` resident memory exceeds
    `max_memory`, or what this process holds now (`held`) plus the memory still available
    (`free`), whichever is less; the line names the `alternatives` (option -> its expected peak)
    that would fit. Returns the line to print when it fits (`note` after the peak). `free` and
    `held` default to this machine's figures now."""
    free = available() if free is None else free
    held = resident() if held is None else held
    budget, source = max_memory, "--max-memory"
    if free is not None and (budget is None or held + free < budget):
        budget, source = held + free, "available memory"
    if budget is None:
        return f"{what}: expected peak memory {format_size(peak)}{note} (available memory unknown: not checked)"
    # Against all the memory there is, the estimate's own error decides: blip2-flan-t5-xl's fp32
    # quantize, estimated at 24.2 GB within 24.5 GB available, was killed at 24.6 GB.
    margin = AVAILABLE_MARGIN if source == "available memory" else 1.0
    if peak * margin > budget:
        detail = (f"{format_size(free)} available now + {format_size(held)} held" if source == "available memory"
                  else f"--max-memory {format_size(budget)}")
        fits = [f"{option} needs about {format_size(need)}" for option, need in (alternatives or {}).items()
                if need <= budget]
        hint = "; ".join(fits) or "free memory, or run it on a machine with more"
        raise MemoryBudgetError(f"{what} needs about {format_size(peak)} of memory at its peak, more than {detail}; "
                                f"{hint}")
    return f"{what}: expected peak memory {format_size(peak)}{note}, within {format_size(budget)} ({source})"


def release_freed_memory() -> None:
    """Collects garbage, then hands the C heap's free pages back to the system (glibc's
    malloc_trim; nothing elsewhere). Tensors freed between two large steps (a stage's cast
    weights after its export) otherwise stay in this process's resident memory: glibc serves
    allocations under its mmap threshold, which rises to 32 MB after the first large free, from
    heaps it does not shrink by itself."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        pass
