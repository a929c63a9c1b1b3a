"""LoadedArtifact: one artifact directory, verified and loaded once, for whatever runs it.

    artifact = LoadedArtifact.open("out/toy", task="generation")   # or LoadedArtifact(manifest, ...)
    artifact.family, artifact.runners["vision"], artifact.tokenizer, artifact.preprocessing

The one place that turns a manifest into running parts, in this order: the manifest is
validated, confined, listed and hashed before anything is allocated; the family is looked up
and must serve the task asked for; the stages' placement on the device and backend (and the
kernels they need from the installed ONNX Runtime) is checked before any session is built; one
runner per stage, each checked against the manifest's inputs and outputs; the embedding table
(LLM families), the preprocessing and the tokenizers; and last, the files loaded by path are
rechecked against their hashes. Blip2Pipeline, Blip2Retriever, quantize, serving and the
profiler all start from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime import synthetic
from runtime.artifact.checks import check_runner_io, load_embeddings
from runtime.artifact.manifest import Manifest, load_manifest
from runtime.backends.auto import auto_runners
from runtime.backends.kernel_support import check_installed_kernels
from runtime.backends.onnxrt import available_providers
from runtime.backends.stage_runners import build_runners, check_backend
from runtime.backends.threads import ThreadSettings
from runtime.errors import ArtifactError, OptionError
from runtime.families import Family, family_for
from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS, Preprocessing
from runtime.tokenizer import TextTokenizer

# task -> what to do with an artifact of the other task (each message names the way out)
WRONG_TASK = {
    "generation": "has no language model to caption or answer with; use Blip2Retriever or `blip2-edge match`",
    "retrieval": "has no retrieval heads; export a Blip2ForImageTextRetrieval checkpoint (e.g. Salesforce/blip2-itm-vit-g)",
}


class LoadedArtifact:
    """The verified manifest and everything loaded from it. Nothing changes after construction,
    so one object serves any number of threads (ONNX Runtime sessions and the tokenizers are
    thread-safe)."""

    def __init__(self, manifest: Manifest, task: str, device: str = "cpu", backend: str = "onnxruntime",
                 threads: ThreadSettings | None = None, precision: str = "f32", stages: tuple[str, ...] | None = None):
        """precision: OpenVINO's inference precision (f32, bf16, f16) under backend "openvino";
        another backend runs each graph in its own precision and takes f32 only. backend "auto":
        on the CPU with the openvino extra, each stage where a short measurement (cached per
        artifact and machine) finds it fastest at the fidelity gate (runtime.backends.auto);
        elsewhere the same as "onnxruntime". stages: load these of the artifact's stages alone
        (export's validation runs the visual stages, frees them, then the LLM's); default all."""
        if task not in WRONG_TASK:
            raise OptionError(f"unknown task '{task}'; valid: {', '.join(WRONG_TASK)}")
        check_backend(backend, precision)
        manifest.ensure_verified()  # validated, confined, listed and hashed before anything is allocated
        m = manifest.data
        self.manifest = manifest
        self.model: dict = m["model"]
        self.family: Family = family_for(m)
        self.require(task)
        self.device, self.backend, self.precision = device, backend, precision
        # Under OpenVINO (CPU, Intel GPU or NPU) the stages it cannot run stay on ONNX Runtime's CPU;
        # auto's stages not on OpenVINO are on ONNX Runtime on `device`.
        ort_device = "cpu" if backend == "openvino" else device
        every = self.family.stage_names(self.model)
        self.threads = threads or ThreadSettings()
        for what, names in (("stage_spin", {stage for stage, _ in self.threads.stage_spin}), ("stages", stages or ())):
            unknown = sorted(set(names) - set(every))
            if unknown:  # a misspelt stage would otherwise be ignored silently
                raise OptionError(f"{what} names no stage of this model: {', '.join(unknown)}; "
                                  f"stages: {', '.join(every)}")
        self.stage_names: tuple[str, ...] = tuple(s for s in every if stages is None or s in stages)
        self.float_dtype: np.dtype = manifest.input_dtype(self.family.float_stage)
        ort_backend = "onnxruntime" if backend in ("openvino", "auto") else backend
        self.family.check_placement(manifest.where, self.model, self.float_dtype, ort_device, ort_backend,
                                    available_providers())
        # 8-bit weight-only stages need an ONNX Runtime with 8-bit MatMulNBits kernels where they run.
        check_installed_kernels(manifest.where, {s: manifest.stages[s] for s in self.stage_names}, ort_device,
                                ort_backend)
        # placement: stage -> engine, device, precision, threads, and why a stage is not on the
        # backend's engine (stage_runners.placement_line prints it)
        self.preprocessing = Preprocessing.from_manifest(m["preprocessing"])
        chosen = None
        if backend == "auto":
            chosen = auto_runners(manifest, device, self.stage_names, self.threads, self._sample_pixels)
        if chosen is None:
            chosen = build_runners(manifest, device, ort_backend if backend == "auto" else backend, self.stage_names,
                                   self.threads, self.family.position_limit(self.model), precision)
        self.runners, self.placement = chosen
        for stage, runner in self.runners.items():
            check_runner_io(manifest, stage, runner)
        # The LLM's token embedding table (dtype and shape checked against the manifest); retrieval has none.
        self.embed_table: np.ndarray | None = load_embeddings(manifest) if m.get("embeddings") else None
        self.tokenizer = TextTokenizer(manifest.path(m["tokenizer"]["file"], "tokenizer.file"), m["tokenizer"])
        # InstructBLIP's Q-Former reads the prompt too, in its own (BERT) vocabulary.
        q = m.get("qformer_tokenizer")
        self.qformer_tokenizer = TextTokenizer(manifest.path(q["file"], "qformer_tokenizer.file"), q) if q else None
        manifest.recheck()  # files loaded by path (graphs, tokenizers) are still the ones hashed

    def _sample_pixels(self, n: int) -> np.ndarray:
        """n synthetic scenes preprocessed as the artifact says: what auto measures the stages on."""
        images = [im for _, im in synthetic.make_scenes(n, seed=0)]
        return self.preprocessing.batch(images).astype(self.float_dtype)

    def require(self, task: str) -> None:
        """An ArtifactError, naming the way out, unless this artifact serves `task`."""
        if self.family.task != task:
            m = self.manifest.data
            kind = " ".join(filter(None, (m["architecture"], m.get("llm_family"))))
            raise ArtifactError(f"{self.manifest.where}: a {kind} artifact {WRONG_TASK[task]}")

    @classmethod
    def open(cls, path: str | os.PathLike, task: str, verify: bool = True, **kwargs) -> "LoadedArtifact":
        """Loads an artifact directory; checks its schema version and every file's sha256 first."""
        return cls(load_manifest(Path(path), verify=verify), task, **kwargs)

    def keep_runners(self, stages: tuple[str, ...]) -> None:
        """Frees every other stage's runner (quantize keeps the source's vision stage alone once
        the fidelity references are taken); the artifact then runs only `stages`."""
        for stage in [s for s in self.runners if s not in stages]:
            runner = self.runners.pop(stage)
            if hasattr(runner, "close"):
                runner.close()
            self.placement.pop(stage, None)

    def close(self) -> None:
        """Frees what the runners hold on the device (TensorRT contexts, streams, buffers)."""
        for runner in self.runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()


class FromArtifact:
    """A read-only attribute of an object built on a LoadedArtifact (`self.artifact`) that is the
    artifact's own: `family = FromArtifact()` in a class body."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj.artifact, self.name)


class OnArtifact:
    """What Blip2Pipeline and Blip2Retriever share: they are built on a LoadedArtifact
    (`self.artifact`, one of `task`'s) and show its parts read-only under the same names."""

    # Image files over this many pixels are refused from their header, before decoding.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    manifest = FromArtifact()
    model = FromArtifact()
    family = FromArtifact()
    stage_names = FromArtifact()
    threads = FromArtifact()
    float_dtype = FromArtifact()
    runners = FromArtifact()
    preprocessing = FromArtifact()
    tokenizer = FromArtifact()

    def _load(self, manifest: Manifest | LoadedArtifact, task: str, **load) -> None:
        """`manifest`: a Manifest, loaded here with `load` (device, backend, threads), or a
        LoadedArtifact of `task`, used as it is."""
        if isinstance(manifest, LoadedArtifact):
            manifest.require(task)
            self.artifact = manifest
        else:
            self.artifact = LoadedArtifact(manifest, task, **load)
