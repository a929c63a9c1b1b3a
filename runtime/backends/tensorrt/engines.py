"""The engine manifest and stale-engine detection.

Engines live under `<artifacts>/engines/trt<version>-sm<cc>/` with an `engines.json` naming, per
stage, the engine file, its sha256, the sha256 of the ONNX graph it was built from, the
builder flags and the optimization profile. An engine is executable code for one TensorRT
version and one GPU: only an engine listed there, with a matching hash, for this TensorRT
version, this GPU and the artifact's current graph, is ever deserialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.artifact.atomic_file import replace_file
from runtime.artifact.confinement import confined_path
from runtime.artifact.manifest import Manifest, graph_digest
from runtime.artifact.schema import Obj, Str, check_rule
from runtime.artifact.verified_files import open_regular, read_bounded
from runtime.backends.tensorrt.versions import CUDA_PYTHON, TEGRA_RELEASE, l4t_release
from runtime.errors import ArtifactError, Blip2EdgeError

ENGINE_MANIFEST = "engines.json"
ENGINE_SCHEMA = 1
MAX_ENGINE_MANIFEST_BYTES = 1 << 20
_SHA256 = Str(pattern=re.compile(r"[0-9a-f]{64}"))
# What find_engine reads of engines.json (other keys are informational).
ENGINE_ENTRY = Obj({"engine": Str(nonempty=True), "engine_sha256": _SHA256, "source_graph": Str(),
                    "source_graph_sha256": _SHA256})
ENGINES_JSON = Obj({"trt_version": Str(), "compute_capability": Str(), "gpu": Str(), "engines": Obj()})


class StaleEngineError(Blip2EdgeError):
    """An engine exists but was built for another TensorRT, GPU or graph."""


@dataclass(frozen=True)
class DeviceInfo:
    gpu: str
    compute_capability: str  # "8.7"
    trt_version: str  # "10.3.0"

    @property
    def sm(self) -> str:
        return self.compute_capability.replace(".", "")


# Each Jetson SoC's GPU compute capability (NVIDIA's CUDA GPU list: Orin 8.7, Xavier 7.2, TX2 6.2,
# Nano 5.3), by the SoC name in the device tree: what keys a Jetson's caches when neither nvidia-smi
# nor CUDA (cuda-python) answers.
TEGRA_COMPUTE_CAPABILITY = {"tegra234": "8.7", "tegra194": "7.2", "tegra186": "6.2", "tegra210": "5.3"}
DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")
_COMPUTE_CAPABILITY = re.compile(r"\d+\.\d+")


def nvidia_smi(*fields: str) -> list[str] | None:
    """The first GPU's values for nvidia-smi query fields, or None without nvidia-smi or a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    row = [x.strip() for x in out[0].split(",")] if out else []
    return row if len(row) == len(fields) else None


def tensorrt_version() -> str | None:
    try:
        import tensorrt  # noqa: PLC0415  (optional; only its version is read)

        return tensorrt.__version__
    except ImportError:
        return None


def cuda_device() -> tuple[str, str] | None:
    """The first GPU's name and compute capability from CUDA (cudaGetDeviceProperties' major and
    minor, through cuda-python), or None without cuda-python, a driver or a GPU."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6.1
        except ImportError:
            from cuda import cudart
        err, props = cudart.cudaGetDeviceProperties(0)
    except Exception:  # noqa: BLE001  (not installed, or its libraries do not load: not an answer)
        return None
    if int(getattr(err, "value", err)) != 0:
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00 "), f"{props.major}.{props.minor}"


def tegra_soc(compatible: Path = DEVICE_TREE_COMPATIBLE) -> str | None:
    """The Jetson SoC ('tegra234') named in the device tree's compatible list, if it is a known one."""
    try:
        entries = compatible.read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in entries:
        chip = entry.decode(errors="replace").rpartition(",")[2]
        if chip in TEGRA_COMPUTE_CAPABILITY:
            return chip
    return None


def gpu_identity(tegra_release: Path = TEGRA_RELEASE, compatible: Path = DEVICE_TREE_COMPATIBLE) -> tuple[str, str] | None:
    """The GPU's name and compute capability: nvidia-smi's; else CUDA's (a Jetson's nvidia-smi
    may fail or answer [N/A]); else, on a Jetson, its SoC's. A Jetson's name carries its L4T
    release. None when nothing answers (no NVIDIA GPU)."""
    row = nvidia_smi("name", "compute_cap")
    if row and _COMPUTE_CAPABILITY.fullmatch(row[1]):
        return row[0], row[1]
    l4t = l4t_release(tegra_release)
    found = cuda_device()
    if found is None and l4t is not None and (chip := tegra_soc(compatible)):
        found = (f"Jetson {chip}", TEGRA_COMPUTE_CAPABILITY[chip])
    if found is None:
        return None
    return (f"{found[0]} (L4T {l4t})" if l4t else found[0]), found[1]


def nvidia_device(tegra_release: Path = TEGRA_RELEASE, compatible: Path = DEVICE_TREE_COMPATIBLE) -> DeviceInfo:
    """The GPU (gpu_identity) and TensorRT version (its Python package, if installed) that key
    ONNX Runtime's TensorRT-provider caches, without needing cuda-python; a one-line error when
    the GPU cannot be told (never a cache keyed for an unknown GPU)."""
    found = gpu_identity(tegra_release, compatible)
    if found is None:
        raise Blip2EdgeError("cannot tell which GPU this is (nvidia-smi is missing or failed, and cuda-python cannot ask "
                             f"CUDA), so ONNX Runtime's TensorRT caches cannot be keyed to it: pip install '{CUDA_PYTHON}', "
                             "or repair nvidia-smi")
    return DeviceInfo(gpu=found[0], compute_capability=found[1], trt_version=tensorrt_version() or "unknown")


def engine_dir(artifacts: Path, device: DeviceInfo) -> Path:
    return Path(artifacts) / "engines" / f"trt{device.trt_version}-sm{device.sm}"


def write_engine_manifest(directory: Path, device: DeviceInfo, entries: dict[str, dict]) -> None:
    """entries: stage -> {"engine", "engine_sha256", "source_graph", "source_graph_sha256",
    "flags", "profile"}."""
    data = {"schema_version": ENGINE_SCHEMA, **asdict(device), "engines": entries}
    replace_file(Path(directory) / ENGINE_MANIFEST, (json.dumps(data, indent=2) + "\n").encode())


def source_graph_sha(manifest: Manifest, stage: str) -> str:
    return graph_digest(manifest.stage_file(stage))


def find_engine(manifest: Manifest, stage: str, device: DeviceInfo) -> "VerifiedEngine":
    """The engine to run for `stage` on `device`, or a StaleEngineError that says why not and to
    rebuild. Returns the bytes whose sha256 matched the engine manifest, never a path to read again."""
    rebuild = f"run 'blip2-edge build-engines {manifest.root}' on this device"
    directory = engine_dir(manifest.root, device)
    # The engine directory and its engines stay inside the artifact directory (an engine is code).
    confined_path(manifest.root, f"engines/{directory.name}", "engine directory", manifest.root)
    mpath = directory / ENGINE_MANIFEST
    if not mpath.is_file():
        others = sorted(p.name for p in (manifest.root / "engines").glob("trt*")) if (manifest.root / "engines").is_dir() else []
        built = f" (engines exist for {', '.join(others)})" if others else ""
        raise StaleEngineError(f"no TensorRT {device.trt_version} engines for sm{device.sm}{built}; {rebuild}")
    data = read_engine_manifest(mpath)
    if data.get("trt_version") != device.trt_version:
        raise StaleEngineError(f"{mpath}: built with TensorRT {data.get('trt_version')}, this is {device.trt_version}; {rebuild}")
    if data.get("compute_capability") != device.compute_capability or data.get("gpu") != device.gpu:
        raise StaleEngineError(f"{mpath}: built for {data.get('gpu')} (sm{data.get('compute_capability')}), "
                               f"this is {device.gpu} (sm{device.compute_capability}); {rebuild}")
    entry = data["engines"].get(stage)
    if entry is None:
        raise StaleEngineError(f"{mpath}: no engine for stage '{stage}'; {rebuild} --stages {stage}")
    check_rule(ENGINE_ENTRY, entry, f"engines.{stage}", mpath)
    path = confined_path(directory, entry["engine"], f"engines.{stage}.engine", mpath)
    if entry["source_graph_sha256"] != source_graph_sha(manifest, stage):
        raise StaleEngineError(f"{path}: built from an older {entry['source_graph']}; {rebuild}")
    try:
        data = read_regular_file(path)
    except ArtifactError:
        data = None
    # The bytes hashed are the bytes returned, and the runner deserialises exactly those: the
    # file is never read again by path (it could be swapped in between).
    if data is None or hashlib.sha256(data).hexdigest() != entry["engine_sha256"]:
        # An engine is code: a file that is not the one the manifest recorded is never loaded.
        raise StaleEngineError(f"{path}: missing or not the engine recorded in {ENGINE_MANIFEST} (sha256 mismatch); "
                               f"refusing to deserialise it; {rebuild}")
    return VerifiedEngine(path, data)


@dataclass(frozen=True)
class VerifiedEngine:
    """An engine file and the bytes of it whose sha256 matched engines.json."""

    path: Path
    data: bytes = field(repr=False)


def read_regular_file(path: Path) -> bytes:
    """The whole of a regular file, read through one descriptor (never a FIFO or a device)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        chunks, offset = [], 0
        while block := os.pread(fd, max(1 << 20, size - offset), offset):
            chunks.append(block)
            offset += len(block)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_engine_manifest(mpath: Path) -> dict:
    """engines.json, validated; a StaleEngineError when it is not one (an ArtifactError when
    it is not a regular file)."""
    raw = read_bounded(mpath, MAX_ENGINE_MANIFEST_BYTES)
    try:
        data = json.loads(raw) if len(raw) <= MAX_ENGINE_MANIFEST_BYTES else None
    except (ValueError, RecursionError):
        data = None
    if data is None:
        raise StaleEngineError(f"{mpath}: not a valid engine manifest (not JSON, or over 1 MB); rebuild the engines")
    check_rule(ENGINES_JSON, data, "", mpath)
    return data


def ort_trt_cache_dir(artifacts: Path, ort_version: str, device: DeviceInfo) -> Path:
    """Engine and timing caches of ONNX Runtime's TensorRT execution provider, keyed so that a
    different onnxruntime, TensorRT or GPU never picks up another's cache."""
    return Path(artifacts) / "engines" / f"ort{ort_version}-trt{device.trt_version}-sm{device.sm}"


# The command that writes TensorRT-readable (int8 symmetric) visual stages.
GPU_READY_COMMAND = "blip2-edge quantize SRC OUT --target gpu"


def require_tensorrt_readable(manifest: Manifest, stages) -> None:
    """Refuses stages quantized for the CPU (uint8 activations, which TensorRT cannot parse) or
    with an INT32 bias (TensorRT dequantizes INT8/FP8/INT4 only), naming the command that makes
    a GPU-ready artifact."""
    for stage in stages:
        q = manifest.stages.get(stage, {}).get("quantization") or {}
        if q.get("tensorrt_compatible") is False:
            raise Blip2EdgeError(
                f"stage '{stage}' of {manifest.root} was quantized for the CPU (target "
                f"'{q.get('target', 'cpu')}', uint8 activations), which TensorRT cannot run; quantize the "
                f"FP32/FP16 export for the GPU instead: {GPU_READY_COMMAND}")
        if q.get("format") == "QDQ" and q.get("bias") != "float":  # an older quantize kept ORT's INT32 bias
            raise Blip2EdgeError(
                f"stage '{stage}' of {manifest.root} was quantized with an INT32 bias, which TensorRT cannot "
                f"dequantize; quantize the FP32/FP16 export again with this blip2-edge: {GPU_READY_COMMAND}")
