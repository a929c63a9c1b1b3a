"""Jetson's tegrastats: a parser for its lines (JetPack 4 to 6 formats) and a sampler that runs it
during a profile and reports RAM, GPU load and power."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

_RAM = re.compile(r"RAM (\d+)/(\d+)MB")
_GPU = re.compile(r"GR3D_FREQ (\d+)%")
# Power rails: "VDD_IN 5087mW/5087mW" (JetPack 5/6) or "POM_5V_IN 3245/3245" (JetPack 4, mW).
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*(?:_IN|_GPU_SOC|_CPU_CV|_SOC|_GPU|_CPU|_DDR|_SYS_5V0|_CV))\s+(\d+)(?:mW)?/(\d+)(?:mW)?")
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


def parse_line(line: str) -> dict:
    """One tegrastats line -> {"ram_used_mb", "ram_total_mb", "gpu_load_pct", "power_mw", "rails"}."""
    out: dict = {}
    if m := _RAM.search(line):
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _GPU.search(line):
        out["gpu_load_pct"] = int(m.group(1))
    rails = {name: int(now) for name, now, _avg in _RAIL.findall(line)}
    if rails:
        out["rails"] = rails
        total = next((rails[r] for r in _TOTAL_RAILS if r in rails), None)
        out["power_mw"] = total if total is not None else sum(rails.values())
    return out


def tegrastats_summary(samples: list[dict]) -> dict:
    """Mean and max of RAM use, GPU load and power over the parsed samples."""
    def stat(key):
        values = [s[key] for s in samples if key in s]
        return {"mean": sum(values) / len(values), "max": max(values)} if values else None

    return {"samples": len(samples), "ram_used_mb": stat("ram_used_mb"), "gpu_load_pct": stat("gpu_load_pct"),
            "power_mw": stat("power_mw")}


class Sampler:
    """Runs `tegrastats --interval MS` in the background while a profile runs."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.samples: list[dict] = []
        self._proc = None
        self._thread = None

    @staticmethod
    def available() -> bool:
        return shutil.which("tegrastats") is not None

    def __enter__(self) -> "Sampler":
        if self.available():
            self._proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            parsed = parse_line(line)
            if parsed:
                self.samples.append(parsed)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
            self._thread.join(timeout=5)

    def summary(self) -> dict | None:
        return tegrastats_summary(self.samples) if self.samples else None
