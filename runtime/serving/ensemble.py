"""The GPU variant of a Triton repository (`triton-repo --ensemble`): the visual stages on
Triton's own ONNX Runtime backend (with its TensorRT accelerator), the rest in Python, wired as
an ensemble. UNVERIFIED: no machine of this project has a GPU with Triton's ONNX Runtime
backend; the configs follow Triton's documented model configuration and the accelerator keys its
onnxruntime backend parses (src/onnxruntime.cc), and are checked here only for what they say
(tests/runtime/test_serving_repo.py).

    <name>_preprocess  (python)            image BYTES -> pixel_values
    <name>_vision      (onnxruntime_onnx)  pixel_values -> image_embeds      KIND_GPU, TensorRT accelerator
    <name>_qformer     (onnxruntime_onnx)  image_embeds -> query_embeds      KIND_GPU, TensorRT accelerator
    <name>_llm         (python)            query_embeds, prompt -> text, tokens (decoder on ORT CUDA)
    <name>             (ensemble)          image, prompt -> text, tokens

The TensorRT accelerator of each visual stage (accelerator_parameters):
- precision from the manifest: FP32 for an FP32 graph, FP16 for an FP16 one, INT8 for the QDQ
  graphs of `quantize --target gpu|portable` (TensorRT reads the scales from the Q/DQ pairs;
  Triton's precision_mode takes one value, so an INT8 stage of an FP16 export runs its float
  layers as TensorRT picks). A stage TensorRT cannot read (`--target cpu`: uint8 activations, or
  an INT32 bias) is refused before anything is written.
- an engine and timing cache per stage model, so a restart loads the engines instead of
  building them again. Triton has no per-instance setting (every instance of a model gets the
  same accelerator parameters), so a model's instances share its directory; ONNX Runtime keys
  each file by the graph and the GPU's compute capability.
- one optimization profile over Triton's batch sizes (1 to max_batch_size, tuned for the
  largest), the other dims fixed by the manifest (runtime.backends.tensorrt.profiles), so the
  engine is built once rather than again for each new batch size.

For native TensorRT engines, build them on the serving GPU (`blip2-edge build-engines`) and
replace a stage's model with a `tensorrt_plan` one; engines are tied to one GPU and TensorRT
version, so a repository meant for a fleet carries the ONNX graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from runtime.artifact.manifest import Manifest
from runtime.backends.onnxrt import profile_option
from runtime.backends.tensorrt.engines import require_tensorrt_readable
from runtime.backends.tensorrt.profiles import ProfileRanges, Range, stage_profile
from runtime.errors import Blip2EdgeError, OptionError
from runtime.serving.model_config import BatchingSettings, python_model_config, quote
from runtime.serving.repository import ARTIFACTS, copy_artifacts, link_or_copy, serving_params, write_model

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8"}
VISUAL_STAGES = ("vision", "qformer")
TRT_CACHE = "trt_cache"  # each stage model's cache directory, beside its version directory


def _dims(shape: list) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape[1:])  # without the batch axis


def _tensors(specs: list[dict]) -> str:
    return ",\n".join(f"  {{ name: {quote(t['name'])} data_type: {TRITON_TYPES[t['dtype']]} dims: [ {_dims(t['shape'])} ] }}"
                      for t in specs)


def max_batch(batching: BatchingSettings) -> int:
    """max_batch_size of every model of the ensemble: Triton requires an ensemble's to be no
    larger than its steps', and a Python step without dynamic batching takes one request."""
    return batching.max_batch if batching.dynamic else 1


def stage_precision(stage: dict) -> str:
    """The TensorRT accelerator's precision_mode for a stage of the manifest: INT8 for QDQ graphs,
    FP16 for an FP16 graph, else FP32 (Triton takes one value)."""
    if (stage.get("quantization") or {}).get("format") == "QDQ":
        return "INT8"
    floats = {t["dtype"] for t in stage["inputs"] if t["dtype"].startswith("float")}
    return "FP16" if floats == {"float16"} else "FP32"


def accelerator_parameters(stage: dict, batching: BatchingSettings, cache_dir: str) -> dict[str, str]:
    """The TensorRT accelerator's parameters (keys of Triton's onnxruntime backend, which maps
    them to ONNX Runtime's trt_* provider options): precision, engine and timing caches in
    `cache_dir`, and the optimization profile of Triton's batch sizes."""
    b = max_batch(batching)
    shapes = stage_profile(stage, ProfileRanges(batch=Range(1, b, b, "--max-batch")))
    return {"precision_mode": stage_precision(stage),
            "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache_dir,
            "trt_timing_cache_enable": "1", "trt_timing_cache_path": cache_dir,
            "trt_profile_min_shapes": profile_option(shapes, 0),
            "trt_profile_opt_shapes": profile_option(shapes, 1),
            "trt_profile_max_shapes": profile_option(shapes, 2)}


def onnx_stage_config(name: str, stage: dict, batching: BatchingSettings, cache_dir: str) -> str:
    delay_us = int(round(batching.max_queue_delay_ms * 1000))
    parameters = "\n".join(f"  parameters {{ key: {quote(k)} value: {quote(v)} }}"
                           for k, v in accelerator_parameters(stage, batching, cache_dir).items())
    return (f"name: {quote(name)}\n"
            'platform: "onnxruntime_onnx"\n'
            f"default_model_filename: {quote(Path(stage['file']).name)}\n"
            f"max_batch_size: {max_batch(batching)}\n"
            + (f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n" if batching.dynamic else "") +
            f"input [\n{_tensors(stage['inputs'])}\n]\n"
            f"output [\n{_tensors(stage['outputs'])}\n]\n"
            f"instance_group [ {{ count: {batching.instances} kind: KIND_GPU }} ]\n"
            "optimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
            f'  name: "tensorrt"\n{parameters}\n'
            "} ] } }\n")


def check_tensorrt_readable(manifest: Manifest) -> None:
    """The visual stages must be graphs the TensorRT accelerator can build (not `--target cpu`)."""
    try:
        require_tensorrt_readable(manifest, VISUAL_STAGES)
    except Blip2EdgeError as exc:
        raise Blip2EdgeError(f"--ensemble runs the visual stages on TensorRT: {exc}") from None


def ensemble_config(name: str, manifest: Manifest, batching: BatchingSettings) -> str:
    pixels, embeds = manifest.stages["vision"]["inputs"][0], manifest.stages["vision"]["outputs"][0]
    query = manifest.stages["qformer"]["outputs"][0]

    def step(model: str, inputs: dict, outputs: dict) -> str:
        maps = [f"input_map {{ key: {quote(k)} value: {quote(v)} }}" for k, v in inputs.items()]
        maps += [f"output_map {{ key: {quote(k)} value: {quote(v)} }}" for k, v in outputs.items()]
        return f"  {{ model_name: {quote(model)} model_version: -1 {' '.join(maps)} }}"

    steps = [step(f"{name}_preprocess", {"image": "image"}, {pixels["name"]: "pixel_values"}),
             step(f"{name}_vision", {pixels["name"]: "pixel_values"}, {embeds["name"]: "image_embeds"}),
             step(f"{name}_qformer", {embeds["name"]: "image_embeds"}, {query["name"]: "query_embeds"}),
             step(f"{name}_llm", {"query_embeds": "query_embeds", "prompt": "prompt"},
                  {"text": "text", "tokens": "tokens"})]
    return (f"name: {quote(name)}\n"
            'platform: "ensemble"\n'
            f"max_batch_size: {max_batch(batching)}\n"
            'input [\n  { name: "image" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }\n]\n'
            'output [\n  { name: "text" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'
            "ensemble_scheduling { step [\n" + ",\n".join(steps) + "\n] }\n")


def _python_step(out: Path, name: str, role: str, batching: BatchingSettings, params: dict, io: tuple[str, str]):
    model = write_model(out, name, batching, {**params, "role": role})
    config = python_model_config(name, batching, {**params, "role": role})
    start, end = config.index("input ["), config.index("instance_group")
    (model / "config.pbtxt").write_text(config[:start] + io[0] + io[1] + config[end:])
    return model


def write_ensemble_repo(tmp: Path, manifests: Sequence[Manifest], names: Sequence[str], batching: BatchingSettings,
                        device: str = "cuda", max_image_pixels: int | None = None, intra_op_threads: int = 0,
                        root: str | None = None, trt_cache: str | None = None, out: Path | None = None) -> None:
    """The ensemble repository, written into `tmp` (atomically renamed to `out` by the caller).
    `trt_cache`: an existing directory on the serving machine for the TensorRT caches, one
    subdirectory per stage model; default: each stage model's own `trt_cache` directory in the
    repository, by absolute path under `out` (ONNX Runtime reads a relative path from
    tritonserver's working directory)."""
    if any(m.data["architecture"] == "instructblip" for m in manifests):
        # Its Q-Former reads the instruction, which the ensemble's qformer step is not given.
        raise OptionError("--ensemble does not support InstructBLIP artifacts yet; write the repository "
                          "without --ensemble")
    for m in manifests:  # before anything is written
        check_tensorrt_readable(m)
    final = Path(out if out is not None else tmp).absolute()
    for m, name in zip(manifests, names):
        for stage in VISUAL_STAGES:
            model = tmp / f"{name}_{stage}"
            (model / "1").mkdir(parents=True)
            if trt_cache:
                cache_dir = str(Path(trt_cache).absolute() / model.name)
            else:
                (model / TRT_CACHE).mkdir()
                cache_dir = str(final / model.name / TRT_CACHE)
            (model / "config.pbtxt").write_text(onnx_stage_config(model.name, m.stages[stage], batching, cache_dir))
            graph = m.stages[stage]["file"]
            for relative in m.data["files"]:  # the graph and its external data, under their own names
                if relative == graph or relative.startswith(graph + "."):
                    link_or_copy(m.path(relative, f"files[{relative!r}]"), model / "1" / Path(relative).name)
        pixels, query = m.stages["vision"]["inputs"][0], m.stages["qformer"]["outputs"][0]
        llm_device = "cuda" if device == "cpu" else device
        params = serving_params(ARTIFACTS, llm_device, max_image_pixels, intra_op_threads, root)
        llm = _python_step(tmp, f"{name}_llm", "llm", batching, params, (
            f"input [\n  {{ name: \"query_embeds\" data_type: {TRITON_TYPES[query['dtype']]} "
            f"dims: [ {_dims(query['shape'])} ] }},\n  {{ name: \"prompt\" data_type: TYPE_STRING dims: [ 1 ] }}\n]\n",
            'output [\n  { name: "text" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'))
        copy_artifacts(m, llm / ARTIFACTS)
        pre_params = {**params, "artifacts": f"../{name}_llm/{ARTIFACTS}"}
        _python_step(tmp, f"{name}_preprocess", "preprocess", batching, pre_params, (
            'input [\n  { name: "image" data_type: TYPE_STRING dims: [ 1 ] }\n]\n',
            f"output [\n  {{ name: {quote(pixels['name'])} data_type: {TRITON_TYPES[pixels['dtype']]} "
            f"dims: [ {_dims(pixels['shape'])} ] }}\n]\n"))
        (tmp / name / "1").mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(ensemble_config(name, m, batching))
