"""OpenVINO backend: one compiled model per stage graph, compiled from the artifact's ONNX files
(the manifest's verified paths; external data beside the graph is read from there), or imported
from the blobs of an earlier compile kept in the user's cache directory (openvino_cache, CPU).

OpenVINO is an optional extra (`openvino`): it is imported on first use through import_openvino,
which names the extra when it is missing. The precision is always explicit: the stage is compiled
with INFERENCE_PRECISION_HINT set to what was asked for (f32 unless told otherwise; OpenVINO's own
default on a CPU with bf16 hardware would be bf16), and the precision the compiled model reports is
checked against it and recorded, so a precision asked for by name is never silently replaced.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.backends import openvino_cache
from runtime.errors import ArtifactError, Blip2EdgeError, MissingExtraError, OptionError
from runtime.host_cpu import cpu_flags

PRECISIONS = ("f32", "bf16", "f16")
# --device names under --backend openvino -> OpenVINO's device names (GPU.1 etc. pass through)
OV_DEVICES = ("cpu", "gpu", "npu")
# /proc/cpuinfo flags that give a CPU native arithmetic in a precision (OpenVINO's CPU plugin
# emulates neither: without them a bf16 or f16 hint would be refused or run at f32).
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "f16": ("avx512_fp16", "amx_fp16")}
# OPTIMIZATION_CAPABILITIES names of the precisions, for devices other than the CPU
CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
# OpenVINO element type names -> the manifest's numpy names
OV_TYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32", "i8": "int8",
            "u8": "uint8", "boolean": "bool"}

_core = None
_core_lock = threading.Lock()
log = logging.getLogger(__name__)


def import_openvino():
    """The openvino package, imported on first use; a MissingExtraError naming the extra when
    it is not installed."""
    try:
        return importlib.import_module("openvino")
    except ImportError as exc:
        if exc.name and not exc.name.startswith("openvino"):
            raise  # a package openvino needs is broken: not ours to explain
        raise MissingExtraError("openvino", "openvino", "--backend openvino") from None


def core():
    """One OpenVINO Core per process (each Core loads its own plugins)."""
    global _core
    with _core_lock:
        if _core is None:
            _core = import_openvino().Core()
        return _core


def openvino_version() -> str:
    return import_openvino().get_version().split("-")[0]


def native_precisions(flags: frozenset[str] | set[str]) -> tuple[str, ...]:
    """The precisions a CPU with these /proc/cpuinfo flags computes natively."""
    return ("f32", *(p for p, needs in NATIVE_FLAGS.items() if set(needs) & set(flags)))


def precision_refusal(precision: str, flags: frozenset[str] | set[str]) -> str | None:
    """Why a CPU with `flags` cannot run `precision` natively (one line), or None when it can."""
    if precision in native_precisions(flags):
        return None
    wanted = " or ".join(f.upper().replace("_", "-") for f in NATIVE_FLAGS[precision])
    return (f"--precision {precision}: this CPU has no native {precision} ({wanted} is not among its "
            f"/proc/cpuinfo flags); use --precision f32")


def ov_device(device: str) -> str:
    """--device (cpu, gpu, npu, gpu.1) as OpenVINO names it (CPU, GPU, NPU, GPU.1)."""
    if device.split(".")[0].lower() not in OV_DEVICES:
        raise OptionError(f"unknown device '{device}' for --backend openvino; valid: {', '.join(OV_DEVICES)} "
                          "(an Intel GPU or NPU by OpenVINO's name, e.g. gpu.1)")
    return device.upper()


def check_precision(precision: str, device: str, flags: frozenset[str] | None = None) -> None:
    """A one-line OptionError unless OpenVINO can run `precision` natively on `device` (an
    OpenVINO name): on the CPU from its flags (`flags`, default /proc/cpuinfo), elsewhere from
    the device's OPTIMIZATION_CAPABILITIES."""
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if precision == "f32":
        return
    if device == "CPU":
        flags = cpu_flags() if flags is None else flags
        if flags is not None:
            refusal = precision_refusal(precision, flags)
            if refusal:
                raise OptionError(refusal)
            return
    capabilities = core().get_property(device, "OPTIMIZATION_CAPABILITIES")
    if CAPABILITY[precision] not in capabilities:
        raise OptionError(f"--precision {precision}: OpenVINO's {device} does not offer it (its capabilities: "
                          f"{', '.join(capabilities)}); use --precision f32")


def check_device(device: str) -> None:
    """A one-line error when OpenVINO has no such device here (a GPU without its driver)."""
    available = core().available_devices
    if device not in available and not any(a.startswith(device + ".") for a in available):
        raise Blip2EdgeError(f"--device {device.lower()}: OpenVINO finds no {device} here (it has "
                             f"{', '.join(available) or 'none'}); an Intel GPU or NPU needs its driver installed")


def _reason(exc: BaseException) -> str:
    """OpenVINO's message on one line, without the source locations it stacks before it."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(("Exception from ", "Check '"))]
    return " ".join(" ".join(kept or lines).split())[:300]


def _port_name(port, declared: tuple[str, ...]) -> str:
    """A port's name as the manifest knows it: OpenVINO gives a graph input every name that
    its tensor had in the ONNX graph (a Cast it removed adds the Cast's), in no set order."""
    names = port.get_names()
    for name in declared:
        if name in names:
            return name
    return port.get_any_name()


def _dims(shape) -> list:
    return [d.get_length() if d.is_static else "?" for d in shape]


class OpenVinoRunner:
    """Runs one graph compiled by OpenVINO. The compiled model is shared; each thread gets its
    own infer request (a request runs one inference at a time)."""

    def __init__(self, path: Path, device: str = "CPU", precision: str = "f32", threads: int = 0,
                 input_names: tuple[str, ...] = (), output_names: tuple[str, ...] = (), pinning: bool | None = None,
                 cache: Callable[[dict], Path] | None = None):
        """device: OpenVINO's name (CPU, GPU, NPU). threads: INFERENCE_NUM_THREADS on the CPU
        (0: OpenVINO's default, one per physical core). input_names/output_names: the manifest's,
        to name the ports by. pinning: ENABLE_CPU_PINNING on the CPU (None: OpenVINO's default;
        ThreadSettings.openvino_pinning). cache: the compile settings -> the directory of this
        stage's compiled blobs (openvino_cache; the CPU only), or None to compile from the ONNX
        file each time."""
        self.path = Path(path)
        self.ov_device = device
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU" and threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if device == "CPU" and pinning is not None:
            config["ENABLE_CPU_PINNING"] = pinning
        directory = cache(config) if cache is not None and device == "CPU" else None
        before = openvino_cache.prepare(directory) if directory is not None else None
        self.compiled = None
        if before is not None:  # from the file's path: on a hit OpenVINO does not read the ONNX graph
            try:
                self.compiled = core().compile_model(str(self.path), device, {**config, "CACHE_DIR": str(directory)})
            except RuntimeError as exc:  # the cache (a full disk?) or the graph: the graph says which, below
                log.debug("%s: compiling with the cache failed (%s); compiling without it", self.path, _reason(exc))
                before = None
        if self.compiled is None:
            try:
                self.compiled = core().compile_model(core().read_model(str(self.path)), device, config)
            except RuntimeError as exc:  # OpenVINO's errors are RuntimeErrors
                raise OpenVinoCannotRunError(f"{self.path}: OpenVINO cannot run this graph ({_reason(exc)})") from None
        # "read": imported from verified blobs; "written": compiled, its blobs kept; None: not cached
        self.cache = openvino_cache.settle(directory, before) if before is not None else None
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if got != precision:
            raise Blip2EdgeError(f"{self.path}: asked OpenVINO's {device} for {precision} but it compiled {got}; "
                                 "use --precision f32")
        self.precision = got
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS")) if device == "CPU" else 0
        self.pinning = bool(self.compiled.get_property("ENABLE_CPU_PINNING")) if device == "CPU" else None
        self.device = device.split(".")[0].lower()  # never "cuda": the pipeline keeps its cache on the host
        self.input_names = [_port_name(p, tuple(input_names)) for p in self.compiled.inputs]
        self.output_names = [_port_name(p, tuple(output_names)) for p in self.compiled.outputs]
        self._local = threading.local()

    def graph_io(self) -> dict[str, list[tuple]]:
        """inputs/outputs: (name, dtype, shape) as the compiled model sees them, for the checks
        against the manifest (runtime.artifact.checks.check_graph_io)."""
        def listed(ports, names):
            return [(n, OV_TYPES.get(p.get_element_type().get_type_name(), p.get_element_type().get_type_name()),
                     _dims(p.get_partial_shape())) for n, p in zip(names, ports)]
        return {"inputs": listed(self.compiled.inputs, self.input_names),
                "outputs": listed(self.compiled.outputs, self.output_names)}

    def describe(self) -> dict:
        return {"engine": "openvino", "device": self.ov_device, "precision": self.precision, "threads": self.threads,
                **({"pinning": self.pinning} if self.pinning is not None else {}),
                **({"compiled_cache": self.cache} if self.cache is not None else {})}

    def _request(self):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._request()
        try:
            # Inputs are copied into the request's tensors (the caller may reuse its arrays);
            # outputs come back as arrays of their own (the request reuses its tensors).
            results = request.infer({n: np.ascontiguousarray(v) for n, v in feeds.items()}, share_outputs=False)
        except RuntimeError as exc:
            raise ArtifactError(f"{self.path.name}: OpenVINO refused these inputs ({_reason(exc)}); the graph "
                                "does not match its manifest") from None
        return {n: results[i] for i, n in enumerate(self.output_names)}

    def close(self) -> None:
        self._local = threading.local()
        self.compiled = None


class OpenVinoCannotRunError(Blip2EdgeError):
    """OpenVINO cannot read or compile a graph (an operator its ONNX reader lacks)."""
