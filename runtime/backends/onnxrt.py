"""ONNX Runtime backend: one InferenceSession per stage graph.

ONNX Runtime comes in flavours that install the same `onnxruntime/` package folder (onnxruntime
for the CPU, onnxruntime-gpu, NVIDIA's Jetson builds of onnxruntime-gpu, onnxruntime-openvino...):
two of them in one environment overwrite each other's files, the last installed winning. So the
base install asks for none, the `cpu` and `gpu` extras each bring one, and everything in the
runtime imports it through import_onnxruntime, which says in one line what to install when none
imports.
"""

from __future__ import annotations

import importlib
import io
import logging
import re
import warnings
from contextlib import contextmanager, redirect_stdout
from importlib import metadata
from pathlib import Path

import numpy as np

# ThreadSettings moved to runtime.backends.threads (it serves OpenVINO too); kept importable from here
from runtime.backends.threads import SPIN_MODES, STEP_STAGES, ThreadSettings  # noqa: F401
from runtime.errors import ArtifactError, Blip2EdgeError, OptionError, install_command

log = logging.getLogger(__name__)

# Distributions that ship the top-level `onnxruntime` package (any other whose top_level.txt
# names it counts too). onnxruntime-extensions and onnxruntime-genai ship packages of their own.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                     "onnxruntime-qnn", "onnxruntime-rocm", "onnxruntime-training", "ort-nightly", "ort-nightly-gpu")
INSTALL_ORT = (f"{install_command('cpu')} (CPU) or {install_command('gpu')} (NVIDIA GPU); on a Jetson, NVIDIA's "
               f"onnxruntime-gpu wheel for your JetPack, then {install_command()} (docs/tensorrt-jetson.md)")


class OnnxRuntimeMissingError(Blip2EdgeError):
    """No ONNX Runtime imports: none is installed, or the installed ones are broken or mixed."""


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def onnxruntime_distributions(path: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, version) of every installed distribution that ships the `onnxruntime` package, in
    `path` (default sys.path), once per name."""
    found: dict[str, tuple[str, str]] = {}
    for dist in metadata.distributions(**({} if path is None else {"path": path})):
        name = dist.metadata["Name"] or ""
        ships = _normalized(name) in ORT_DISTRIBUTIONS or "onnxruntime" in (dist.read_text("top_level.txt") or "").split()
        if name and ships:
            found.setdefault(_normalized(name), (name, dist.version))
    return sorted(found.values())


def flavour_conflict(distributions: list[tuple[str, str]]) -> str | None:
    """The one-line fix when more than one ONNX Runtime flavour is installed, else None."""
    if len(distributions) < 2:
        return None
    names = " ".join(name for name, _ in distributions)
    listed = ", ".join(f"{name} {version}" for name, version in distributions)
    return (f"{listed} are installed together: they share one onnxruntime folder, the last installed overwriting "
            f"the others (a CPU build replacing the GPU one loses the CUDA and TensorRT providers); remove them all "
            f"with pip uninstall -y {names}, then install one: {INSTALL_ORT}")


def import_onnxruntime(submodule: str = ""):
    """onnxruntime (or its `submodule`, e.g. "quantization"), imported on first use; a one-line
    OnnxRuntimeMissingError naming what to install when it does not import."""
    name = f"onnxruntime.{submodule}" if submodule else "onnxruntime"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name and not exc.name.startswith("onnxruntime"):
            raise  # another package onnxruntime needs (onnx for its quantization): not ours to explain
        distributions = onnxruntime_distributions()
        if not distributions:
            raise OnnxRuntimeMissingError(f"ONNX Runtime is not installed: {INSTALL_ORT}") from None
        first = " ".join(str(exc).split())[:200]
        listed = ", ".join(f"{n} {v}" for n, v in distributions)
        fix = flavour_conflict(distributions) or (f"reinstall it: pip install --force-reinstall "
                                                  f"{distributions[0][0]}=={distributions[0][1]}")
        raise OnnxRuntimeMissingError(f"{listed} installed but {name} does not import ({first}); {fix}") from None


def available_providers() -> list[str]:
    """The execution providers this ONNX Runtime was built with (not whether they load)."""
    return list(import_onnxruntime().get_available_providers())


# A one-node model (Relu on float[1], opset 13, IR 8): onnx.helper's serialization of it, kept as
# bytes because the runtime has no onnx (tests/runtime/test_provider_probe.py rebuilds it).
PROBE_MODEL = (b'\x08\x08:3\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x01pZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01'
               b'b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r')
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def provider_loads(provider: str) -> bool:
    """Whether `provider` really loads: get_available_providers() lists every provider ONNX
    Runtime was built with, whether or not its libraries (CUDA, cuDNN, libnvinfer) can be loaded;
    a session asked for [provider, CPU] keeps only those that loaded (get_providers())."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        # ONNX Runtime prints its fallback notice on stdout and warns for a provider it lacks.
        with redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(PROBE_MODEL, options, providers=[provider, "CPUExecutionProvider"])
    except Exception:  # noqa: BLE001  (ONNX Runtime's own exception types: the provider did not load)
        return False
    return provider in session.get_providers()


DEVICES = ("cpu", "cuda", "auto")

# ONNX Runtime's CUDA arena grows by powers of two by default; on a Jetson it shares the unified
# memory with TensorRT's contexts, so it grows only by what is asked for.
CUDA_OPTIONS = {"arena_extend_strategy": "kSameAsRequested"}
PROVIDER_HINTS = {
    "CUDAExecutionProvider": f"ONNX Runtime could not load CUDA or cuDNN: {install_command('gpu')} (onnxruntime-gpu "
                             "with CUDA 12 and cuDNN 9), or use --device auto to fall back to the CPU",
    "TensorrtExecutionProvider": "ONNX Runtime could not load TensorRT 10's libraries (libnvinfer.so.10, which its "
                                 f"TensorRT provider is built on): install TensorRT 10 ({install_command('tensorrt')}, "
                                 "or JetPack's) and put its lib directory (site-packages/tensorrt_libs for the wheels) "
                                 "on LD_LIBRARY_PATH; 'blip2-edge doctor' shows what this machine has",
}


# ONNX Runtime's CUDA provider took `use_tf32` in 1.18 (onnxruntime PRs 19357 and 19426: cuBLAS
# GEMMs and cuDNN convolutions); older builds refuse an unknown option.
TF32_OPTION_SINCE = (1, 18)


def cuda_provider(gpu_mem_limit_mb: int = 0, tf32: bool = True) -> tuple[str, dict]:
    """ONNX Runtime's CUDA provider; gpu_mem_limit_mb > 0 caps its arena (Jetson: leave room
    for TensorRT and the rest of the system in the shared memory); tf32=False turns TF32 off
    (use_tf32=0; left out when True, so ONNX Runtime's default applies and older builds load)."""
    options = dict(CUDA_OPTIONS)
    if gpu_mem_limit_mb > 0:
        options["gpu_mem_limit"] = gpu_mem_limit_mb << 20
    if not tf32:
        options["use_tf32"] = "0"
    return ("CUDAExecutionProvider", options)


def check_tf32_option(tf32: bool, ort_version: str) -> None:
    """TF32 off needs the CUDA provider's use_tf32 option: one line naming the version."""
    release = tuple(int(p) for p in ort_version.split("+")[0].split(".")[:2] if p.isdigit())
    if not tf32 and release < TF32_OPTION_SINCE:
        raise Blip2EdgeError(f"TF32 off (tf32=False, --no-tf32) needs onnxruntime-gpu 1.18 or newer (its CUDA provider's "
                             f"use_tf32 option); this is {ort_version}: upgrade it, or leave TF32 on")


def providers_for(device: str, gpu_mem_limit_mb: int = 0, tf32: bool = True) -> list:
    """Execution providers for a device name; `auto` falls back to the CPU with a warning.
    tf32: see ThreadSettings.tf32."""
    if device not in DEVICES:
        raise OptionError(f"unknown device '{device}'; valid: {', '.join(DEVICES)}")
    available = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        check_tf32_option(tf32, import_onnxruntime().__version__)
        return [cuda_provider(gpu_mem_limit_mb, tf32), "CPUExecutionProvider"]
    if device == "cuda":
        raise Blip2EdgeError(
            "--device cuda: ONNX Runtime has no CUDA provider here; " + (flavour_conflict(onnxruntime_distributions()) or
            f"{install_command('gpu')} (onnxruntime-gpu) on a machine with an NVIDIA GPU, or use --device auto"))
    log.warning("no CUDA execution provider available; running on the CPU")
    return ["CPUExecutionProvider"]


def required_provider(device: str, backend: str = "onnxruntime") -> str | None:
    """The provider a session must really have got: `auto` alone may fall back."""
    if backend in ("onnxruntime-trt",):
        return "TensorrtExecutionProvider"
    if backend == "tensorrt" or device == "cuda":
        return "CUDAExecutionProvider"
    return None


def profile_option(shapes: dict[str, tuple[tuple, tuple, tuple]], which: int) -> str:
    """trt_profile_{min,opt,max}_shapes: 'name:1x3x224x224,other:1x32' (which: 0 min, 1 opt, 2 max)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in ranges[which])}" for name, ranges in shapes.items())


def tensorrt_provider(cache_dir: Path, shapes: dict, fp16: bool, int8: bool) -> tuple[str, dict]:
    """ONNX Runtime's TensorRT execution provider for one stage: explicit optimization profiles
    from the stage's specs (`shapes`: profiles.stage_profile), so its engine is built once for
    the whole range instead of again whenever the decoder's past length leaves the range seen
    so far; engine and timing caches in `cache_dir` (keyed by onnxruntime, TensorRT and GPU:
    engines.ort_trt_cache_dir). fp16/int8 follow the graph (an FP16 export, QDQ stages)."""
    return ("TensorrtExecutionProvider", {
        "trt_fp16_enable": fp16, "trt_int8_enable": int8,
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": profile_option(shapes, 0),
        "trt_profile_opt_shapes": profile_option(shapes, 1),
        "trt_profile_max_shapes": profile_option(shapes, 2),
    })


def gpu_providers(artifacts: Path, stage: dict, fp16: bool, int8: bool, ranges=None, tf32: bool = True) -> list:
    """TensorRT EP first (with `stage`'s profile from `ranges`, default ProfileRanges()), then
    CUDA, then CPU for whatever neither takes. `tf32` reaches the CUDA provider only: the
    TensorRT provider has no option for it (its engines allow TF32, TensorRT's default, unless
    NVIDIA_TF32_OVERRIDE=0 is set when they are built)."""
    from runtime.backends.tensorrt.engines import nvidia_device, ort_trt_cache_dir
    from runtime.backends.tensorrt.profiles import ProfileRanges, stage_profile

    ort = import_onnxruntime()
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise Blip2EdgeError("backend 'onnxruntime-trt' needs onnxruntime-gpu with its TensorRT provider and "
                             "TensorRT's libraries: " + (flavour_conflict(onnxruntime_distributions()) or
                                                         f"{install_command('gpu')} on a machine with an NVIDIA GPU"))
    cache = ort_trt_cache_dir(artifacts, ort.__version__, nvidia_device())
    cache.mkdir(parents=True, exist_ok=True)
    shapes = stage_profile(stage, ranges or ProfileRanges())
    check_tf32_option(tf32, ort.__version__)
    return [tensorrt_provider(cache, shapes, fp16, int8), cuda_provider(tf32=tf32), "CPUExecutionProvider"]


def check_provider(got: list[str], wanted: str | None, path: Path) -> None:
    """A session whose first provider is not the one asked for fell back silently (missing
    libraries): a one-line error instead of running elsewhere without a word."""
    if wanted is not None and (not got or got[0] != wanted):
        raise Blip2EdgeError(f"{path}: asked for {wanted} but ONNX Runtime gave {', '.join(got) or 'nothing'}; "
                             f"{PROVIDER_HINTS.get(wanted, 'check the installation')}")


class OrtRunner:
    """Runs one graph. InferenceSession.run is thread-safe, so one runner serves all threads."""

    def __init__(self, path: Path, providers: list, intra_op_threads: int = 0,
                 allow_spinning: bool | None = None, require_provider: str | None = None,
                 stop_spinning: bool = False, low_memory: bool = False):
        """allow_spinning: None keeps ONNX Runtime's default (spinning); see ThreadSettings.
        require_provider: the provider the session must really have got (else a one-line error).
        stop_spinning: the threads stop spinning when a run returns (session.force_spinning_stop).
        low_memory: one copy of the weights. The CPU provider runs most float16 ops in float32
        between casts it inserts; full optimisation folds the casts of the weights into float32
        copies held beside the float16 ones, the arena keeps every cast's output, and MatMul
        prepacks its float32 weights into a second copy (bench model, fp16 export: the OPT-125m
        decoder, 0.25 GB of weights, held 0.54 GB, 0.27 GB this way; its Q-Former, kept in float32,
        0.40 GB, held 0.56, 0.43 this way; each run 2-3x slower), and casts each weight just before
        its use rather than all of them first."""
        ort = import_onnxruntime()
        so = ort.SessionOptions()
        # Full optimisation: constant folding, LayerNorm/GELU/attention fusions on CPU and CUDA.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if low_memory:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.enable_cpu_mem_arena = False
            so.add_session_config_entry("session.disable_prepacking", "1")
            # The default order runs every weight's inserted Cast as soon as it can, all before the
            # first MatMul: a float32 copy of the weights alive at once (blip2-opt-2.7b fp16 decoder,
            # 5.3 GB of weights: 8.2 GB anonymous peak in a generate). Priority order runs each Cast
            # beside its consumer: 0.9 GB.
            so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        so.intra_op_num_threads = intra_op_threads
        if allow_spinning is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        if stop_spinning:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise Blip2EdgeError(f"{path}: ONNX Runtime cannot load this graph ({' '.join(str(exc).split())[:300]})") from None
        self.path = Path(path)
        check_provider(self.session.get_providers(), require_provider, self.path)
        self.allow_spinning = allow_spinning
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        gpu = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.device = "cuda" if self.session.get_providers()[0] in gpu else "cpu"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._invalid_inputs_named():
            outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))

    @contextmanager
    def _invalid_inputs_named(self):
        """ONNX Runtime's InvalidArgument (the graph refused inputs the manifest promised it would
        take: a position table shorter than the manifest says) as an ArtifactError naming the
        graph. Its other failures (out of memory, a provider's error) stay internal errors."""
        invalid_argument = import_onnxruntime("capi.onnxruntime_pybind11_state").InvalidArgument

        try:
            yield
        except invalid_argument as exc:
            first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{self.path.name}: ONNX Runtime refused these inputs ({first}); the graph does "
                                "not match its manifest") from exc

    def infer_bound(self, feeds: dict, host_outputs: set[str]) -> dict:
        """Runs with I/O binding: inputs may be numpy arrays or OrtValues already on the device;
        outputs not in `host_outputs` stay on the device as OrtValues (the KV cache, between
        decode steps), the others come back as numpy arrays."""
        ort = import_onnxruntime()
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu" if name in host_outputs else self.device)
        with self._invalid_inputs_named():
            self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {n: (v.numpy() if n in host_outputs else v) for n, v in zip(self.output_names, values)}

    def infer_in_place(self, feeds: dict, buffers: dict, host_outputs: set[str]) -> dict:
        """Runs with each of `buffers` (output name -> (input name, OrtValue)) bound as both that
        input and that output: the graph updates them in place (the shared KV cache). Returns
        the `host_outputs` as numpy arrays."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        fresh = [n for n in self.output_names if n not in buffers]
        for name in fresh:  # bound first: get_outputs() lists outputs in the order they were bound
            binding.bind_output(name, "cpu")
        for out_name, (in_name, value) in buffers.items():
            binding.bind_ortvalue_input(in_name, value)
            binding.bind_ortvalue_output(out_name, value)
        with self._invalid_inputs_named():
            self.session.run_with_iobinding(binding)
        values = dict(zip(fresh, binding.get_outputs()))
        return {n: values[n].numpy() for n in host_outputs}

    def to_device(self, array: np.ndarray):
        """An OrtValue of `array` on this runner's device; on the CPU it wraps the array's memory
        (a contiguous one is not copied, so it must stay referenced)."""
        ort = import_onnxruntime()
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)


def stage_runner(path: Path, providers: list, stage: str, threads: ThreadSettings,
                 require_provider: str | None = None) -> OrtRunner:
    """A stage's runner with its thread settings."""
    return OrtRunner(path, providers, threads.intra_op_threads, threads.allow_spinning(stage), require_provider,
                     stop_spinning=threads.stop_spinning(stage), low_memory=threads.low_memory)
