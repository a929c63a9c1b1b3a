"""Helpers shared by the bench/ scripts: cached random-weight models and artifacts, timing of
child processes, the machine line and memory bandwidth (runtime.profiling.machine), weight bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(REPO))
# the machine line's parts live in the runtime (profile prints it too); bench scripts import them from here
from runtime.profiling.machine import machine, machine_line, read_bandwidth, simd_flags  # noqa: E402,F401


def ensure_fp32_artifacts(size: str, llm: str = "opt", kv_cache: str = "auto") -> tuple[Path, Path]:
    """A random-weight checkpoint and its validated FP32 export, built once under bench/out/.
    kv_cache: the export's --kv-cache (auto: shared for OPT/LLaMA); an artifact of another form
    (one written before the shared form existed) is exported again."""
    import json

    from exporter.export import ExportOptions, export
    from exporter.random_models import make_model

    name = size if llm == "opt" else f"{size}-{llm}"
    ckpt = OUT / "models" / name
    if not (ckpt / "config.json").is_file():
        make_model(size, ckpt, llm=llm)
    art = OUT / "artifacts" / (f"{name}-fp32" if kv_cache == "auto" else f"{name}-fp32-{kv_cache}")
    want = None if llm == "t5" else ("shared" if kv_cache == "auto" else kv_cache)
    manifest = art / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["model"].get("kv_cache") != want:
        export(str(ckpt), art, ExportOptions(overwrite=True, kv_cache=kv_cache))
    return ckpt, art


def timed(cmd: list[str]) -> tuple[float, int]:
    """Runs a command; returns its wall seconds and peak RSS in bytes (wait4's rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024


def graph_weight_bytes(path: Path) -> int:
    """Bytes of a graph's initializers: what one decode step reads at batch 1."""
    import onnx

    from exporter.onnx_export import tensor_bytes

    model = onnx.load(str(path), load_external_data=False)
    return sum(tensor_bytes(t, path.parent) for t in model.graph.initializer)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def hf_generate_fn(model, processor, image, **generation):
    """transformers' eager generate from a PIL image to the new token ids (processor included,
    as the pipeline's timings include preprocessing)."""
    import torch

    from exporter.hf_model import generated_from

    def run() -> list[int]:
        inputs = processor(images=[image], text=[""], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, num_beams=1, **generation)
        return out[0, generated_from(model, inputs):].tolist()

    return run
