"""The GPU variant of a Triton repository (`triton-repo --ensemble`): the visual stages on
Triton's own ONNX Runtime backend (with its TensorRT accelerator), the rest in Python, wired as
an ensemble. UNVERIFIED: no machine of this project has a GPU with Triton's ONNX Runtime
backend; the configs follow Triton's documented model configuration and are checked here only
for their layout (tests/runtime/test_serving_repo.py).

    <name>_preprocess  (python)            image BYTES -> pixel_values
    <name>_vision      (onnxruntime_onnx)  pixel_values -> image_embeds      KIND_GPU, TensorRT FP16
    <name>_qformer     (onnxruntime_onnx)  image_embeds -> query_embeds      KIND_GPU, TensorRT FP16
    <name>_llm         (python)            query_embeds, prompt -> text, tokens (decoder on ORT CUDA)
    <name>             (ensemble)          image, prompt -> text, tokens

For native TensorRT engines, build them on the serving GPU (`blip2-edge build-engines`) and
replace a stage's model with a `tensorrt_plan` one; engines are tied to one GPU and TensorRT
version, so a repository meant for a fleet carries the ONNX graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from runtime.artifact.manifest import Manifest
from runtime.errors import OptionError
from runtime.serving.model_config import BatchingSettings, python_model_config, quote
from runtime.serving.repository import ARTIFACTS, copy_artifacts, link_or_copy, serving_params, write_model

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8"}


def _dims(shape: list) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape[1:])  # without the batch axis


def _tensors(specs: list[dict]) -> str:
    return ",\n".join(f"  {{ name: {quote(t['name'])} data_type: {TRITON_TYPES[t['dtype']]} dims: [ {_dims(t['shape'])} ] }}"
                      for t in specs)


def onnx_stage_config(name: str, stage: dict, batching: BatchingSettings) -> str:
    delay_us = int(round(batching.max_queue_delay_ms * 1000))
    return (f"name: {quote(name)}\n"
            'platform: "onnxruntime_onnx"\n'
            f"default_model_filename: {quote(Path(stage['file']).name)}\n"
            f"max_batch_size: {batching.max_batch}\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
            f"input [\n{_tensors(stage['inputs'])}\n]\n"
            f"output [\n{_tensors(stage['outputs'])}\n]\n"
            f"instance_group [ {{ count: {batching.instances} kind: KIND_GPU }} ]\n"
            "optimization { execution_accelerators { gpu_execution_accelerator: [ { name: \"tensorrt\" "
            'parameters { key: "precision_mode" value: "FP16" } } ] } }\n')


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
            f"max_batch_size: {batching.max_batch}\n"
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
                        root: str | None = None) -> None:
    if any(m.data["architecture"] == "instructblip" for m in manifests):
        # Its Q-Former reads the instruction, which the ensemble's qformer step is not given.
        raise OptionError("--ensemble does not support InstructBLIP artifacts yet; write the repository "
                          "without --ensemble")
    for m, name in zip(manifests, names):
        for stage in ("vision", "qformer"):
            model = tmp / f"{name}_{stage}"
            (model / "1").mkdir(parents=True)
            (model / "config.pbtxt").write_text(onnx_stage_config(f"{name}_{stage}", m.stages[stage], batching))
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
