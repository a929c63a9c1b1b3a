"""The checks `blip2-edge doctor DIR` runs on an artifact directory: the CPU pipeline, then each
GPU backend the machine allows, each compared with the CPU (stage outputs by cosine, captions
token for token, two threads at once against one after the other). Every check is pass, fail
or skip-with-reason; a backend asked for by name that cannot run is a failure, not a skip.

Token for token needs full FP32 on the GPU: TF32 (on by default in ONNX Runtime's CUDA provider
and in TensorRT, Ampere and newer) rounds FP32 matrix products' inputs to 10-bit mantissas, and
on random weights with beams that changes tokens. So the comparisons run with TF32 off: the CUDA
provider's use_tf32=0, engines that doctor builds with --no-tf32, and NVIDIA_TF32_OVERRIDE=0 for
the process (strict_fp32), the one switch for the engines ONNX Runtime's TensorRT provider
builds. Engines built with TF32 before doctor ran cannot be compared token for token: their
captions differing is a skip that says how to rebuild them, not a failure."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.backends.stage_runners import VISUAL_STAGES, placement_line
from runtime.backends.threads import ThreadSettings
from runtime.doctor.environment import FAIL, PASS, SKIP, Check, Environment, provider_problem
from runtime.errors import Blip2EdgeError, install_command

BACKENDS = ("cpu", "auto", "cuda", "tensorrt", "onnxruntime-trt")
MAX_NEW_TOKENS = 12
MIN_COSINE = 0.99


# Read by cuBLAS, cuDNN and TensorRT: "0" turns TF32 off whatever the program asks for.
TF32_OVERRIDE = "NVIDIA_TF32_OVERRIDE"
# The GPU pipelines doctor compares with the CPU: TF32 off in ONNX Runtime's CUDA provider.
STRICT = ThreadSettings(tf32=False)


def strict_fp32(environ=os.environ) -> str:
    """Turns TF32 off for the NVIDIA libraries this process loads, unless the user set the
    variable already; call it before any GPU work. Returns the note doctor prints."""
    value = environ.setdefault(TF32_OVERRIDE, "0")
    if value == "0":
        return f"TF32 off for the GPU comparisons ({TF32_OVERRIDE}=0, use_tf32=0, engines built with --no-tf32)"
    return (f"{TF32_OVERRIDE}={value} was set before doctor ran: engines the TensorRT provider builds may use TF32, "
            "and their captions may then differ from the CPU's")


def tf32_stages(entries: dict, stages=VISUAL_STAGES) -> list[str]:
    """The stages whose engines (engines.json entries) may use TF32: built without --no-tf32,
    or before build-engines recorded the flag (TensorRT's default was on)."""
    return [s for s in stages if s in entries and (entries[s].get("flags") or {}).get("tf32", True) is not False]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def sample_images(n: int = 2):
    from runtime import synthetic

    return [image for _, image in synthetic.make_scenes(n, seed=7)]


def caption_tokens(pipe, images) -> list[list[int]]:
    return [r.tokens for r in pipe.caption(images, max_new_tokens=MAX_NEW_TOKENS)]


def threads_match(pipe, images, expected) -> Check | None:
    """Two threads captioning at once give what one caption after the other gave."""
    results, errors = [None] * len(images), []

    def one(i):
        try:
            results[i] = caption_tokens(pipe, [images[i]])[0]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors or any(t.is_alive() for t in threads):
        return f"two threads at once failed: {_one_line(errors[0]) if errors else 'timed out'}"
    if results != expected:
        return "two threads at once gave other tokens than one caption after the other"
    return None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine similarity between matching rows (last axis) of a and b."""
    a = a.astype(np.float64).reshape(-1, a.shape[-1])
    b = b.astype(np.float64).reshape(-1, b.shape[-1])
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)))


def stage_cosines(reference, other, images, batches=(1,)) -> dict[str, float]:
    """The visual stages of `other` against `reference` on the same inputs, per batch size."""
    out = {}
    for batch in batches:
        pixels = reference.preprocessing.batch([images[i % len(images)] for i in range(batch)])
        embeds = reference.runners["vision"].infer({"pixel_values": pixels})
        for stage, feed in (("vision", {"pixel_values": pixels}), ("qformer", embeds)):
            feed = {k: v for k, v in feed.items() if k in reference.runners[stage].input_names}
            a = next(iter(reference.runners[stage].infer(feed).values()))
            b = next(iter(other.runners[stage].infer(feed).values()))
            if a.shape != b.shape:
                raise Blip2EdgeError(f"{stage} at batch {batch}: shape {b.shape}, the CPU gives {a.shape}")
            out[f"{stage}@{batch}"] = round(cosine(a, b), 5)
    return out


@dataclass(frozen=True)
class CacheFile:
    """What shows that a cache file was written again: ONNX Runtime writes its TensorRT engine
    in place (same name, same inode, often the same size), and a rebuild on a coarse-clock or
    fast filesystem may even keep the mtime, so the content hash is compared too."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    sha256: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def cache_snapshot(directory: Path) -> dict[str, CacheFile]:
    """Every regular file under `directory` (the TensorRT provider's `.engine`, `.profile` and
    `.timing` caches), by path relative to it. ONNX Runtime names an engine file after its
    subgraph (prefix, graph hash, compute capability), so an engine built again for a shape
    outside the profile overwrites the same name: the names alone never show a rebuild."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    out = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):  # folders, links: ONNX Runtime writes plain files
            continue
        out[path.relative_to(directory).as_posix()] = CacheFile(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                                                                 _sha256(path))
    return out


def cache_changes(before: dict[str, CacheFile], after: dict[str, CacheFile]) -> list[str]:
    """What was written between two snapshots: 'new NAME', 'rewritten NAME', 'removed NAME'."""
    changes = [f"new {name}" for name in after if name not in before]
    changes += [f"rewritten {name}" for name in after if name in before and after[name] != before[name]]
    changes += [f"removed {name}" for name in before if name not in after]
    return changes


def engine_files(snapshot: dict[str, CacheFile]) -> list[str]:
    return [name for name in snapshot if name.endswith(".engine")]


class ArtifactRun:
    """Runs the checks for one artifact directory; `cpu_tokens` is the reference."""

    def __init__(self, artifacts: Path, env: Environment, requested: tuple[str, ...]):
        self.artifacts, self.env, self.requested = Path(artifacts), env, requested
        self.images = sample_images()
        self.cpu = None
        self.cpu_tokens = None

    def unavailable(self, backend: str, reason: str) -> Check:
        """Asked for by name: a failure; otherwise a skip that says what to install."""
        return Check(backend, FAIL if backend in self.requested else SKIP, reason)

    def run(self) -> list[Check]:
        from runtime.artifact.manifest import load_manifest
        from runtime.pipeline import Blip2Pipeline

        try:
            manifest = load_manifest(self.artifacts, verify=True)
        except Blip2EdgeError as exc:
            return [Check("artifact", FAIL, _one_line(exc))]
        family = manifest.data.get("llm_family") or "no LLM"
        checks = [Check("artifact", PASS, f"{manifest.data['architecture']} / {family}, stages "
                                          f"{', '.join(manifest.stages)}, every file verified")]
        from runtime.families import family_for

        if family_for(manifest.data).task != "generation":  # retrieval: the runs below caption
            return checks + [Check("cpu", SKIP, "a retrieval artifact: check it with 'blip2-edge match'")] + [
                Check(b, FAIL, "doctor does not check retrieval artifacts on this backend yet") for b in self.requested]
        try:
            self.cpu = Blip2Pipeline.from_artifacts(self.artifacts, verify=False)
            results = self.cpu.caption(self.images, max_new_tokens=MAX_NEW_TOKENS)
            self.cpu_tokens, text = [r.tokens for r in results], results[0].text
            problem = threads_match(self.cpu, self.images, self.cpu_tokens)
            checks.append(Check("cpu", FAIL, problem) if problem else
                          Check("cpu", PASS, f"caption {text!r}; two threads at once equal one after the other"))
        except Exception as exc:  # noqa: BLE001  (a doctor reports; --debug shows the traceback)
            return checks + [Check("cpu", FAIL, _one_line(exc))]
        if not self.requested or "auto" in self.requested:
            try:
                checks.append(self.auto())
            except Exception as exc:  # noqa: BLE001
                checks.append(Check("auto", FAIL, _one_line(exc)))
        for backend, method in (("cuda", self.cuda), ("tensorrt", self.tensorrt),
                                ("onnxruntime-trt", self.onnxruntime_trt)):
            if self.requested and backend not in self.requested:
                continue
            try:
                # A graph that cannot run there (an fp32 shared KV cache on CUDA): not a fault
                # of this machine, so a skip that says which export would run, unless asked for.
                family_for(manifest.data).check_placement(
                    manifest.where, manifest.model, self.cpu.float_dtype, "cuda" if backend == "cuda" else "cpu",
                    "onnxruntime" if backend == "cuda" else backend, self.env.providers)
            except Blip2EdgeError as exc:
                checks.append(self.unavailable(backend, _one_line(exc)))
                continue
            try:
                checks.append(method())
            except Exception as exc:  # noqa: BLE001
                checks.append(Check(backend, FAIL, _one_line(exc)))
        return checks

    def compare(self, backend: str, pipe, cosines: dict | None = None, tf32: str | None = None) -> Check:
        """`tf32`: why this pipeline may compute FP32 in TF32 (engines built with it), which
        makes differing captions a skip naming the rebuild instead of a failure."""
        tokens = caption_tokens(pipe, self.images)
        low = {k: v for k, v in (cosines or {}).items() if v < MIN_COSINE}
        if low:
            return Check(backend, FAIL, f"stage outputs differ from the CPU's: cosine {low}")
        if tokens != self.cpu_tokens:
            differ = f"captions differ from the CPU's: {tokens} vs {self.cpu_tokens}"
            if tf32:
                return self.unavailable(backend, f"{differ}; not comparable token for token: {tf32}")
            return Check(backend, FAIL, differ)
        problem = threads_match(pipe, self.images, tokens)
        if problem:
            return Check(backend, FAIL, problem)
        detail = "tokens equal to the CPU's; two threads at once equal one after the other"
        return Check(backend, PASS, detail + (f"; cosine {cosines}" if cosines else ""))

    def auto(self) -> Check:
        """--backend auto (caption's default): which engine and precision each stage runs on here
        and why, and its captions against the CPU pipeline's (ONNX Runtime)."""
        from runtime.backends.auto import openvino_installed
        from runtime.pipeline import Blip2Pipeline

        if not openvino_installed():
            return self.unavailable("auto", f"without the openvino extra --backend auto is ONNX Runtime, as above "
                                            f"({install_command('openvino')} to let it measure OpenVINO here)")
        pipe = Blip2Pipeline.from_artifacts(self.artifacts, backend="auto", verify=False)
        check = self.compare("auto", pipe, stage_cosines(self.cpu, pipe, self.images))
        return Check("auto", check.status, f"placement: {placement_line(pipe.artifact.placement)}; {check.detail}")

    def cuda(self) -> Check:
        from runtime.pipeline import Blip2Pipeline

        if "CUDAExecutionProvider" not in self.env.providers:
            return self.unavailable("cuda", f"ONNX Runtime has no CUDA provider: {install_command('gpu')} "
                                            "(onnxruntime-gpu; on a Jetson NVIDIA's wheel for your JetPack)")
        if problem := provider_problem(self.env, "CUDAExecutionProvider"):
            return self.unavailable("cuda", problem)
        pipe = Blip2Pipeline.from_artifacts(self.artifacts, device="cuda", verify=False, threads=STRICT)
        return self.compare("cuda", pipe, stage_cosines(self.cpu, pipe, self.images))

    def tensorrt(self) -> Check:
        from runtime.backends.tensorrt.engines import ENGINE_MANIFEST, StaleEngineError, read_engine_manifest
        from runtime.pipeline import Blip2Pipeline

        if self.env.tensorrt is None or self.env.cuda_python is None or not (self.env.gpu or self.env.jetson):
            missing = [n for n, v in (("an NVIDIA GPU", self.env.gpu or self.env.jetson),
                                      ("TensorRT", self.env.tensorrt), ("cuda-python", self.env.cuda_python)) if not v]
            return self.unavailable("tensorrt", f"needs {', '.join(missing)}: {install_command('tensorrt')} "
                                                "(on a Jetson: JetPack's TensorRT, see docs/tensorrt-jetson.md)")
        if "CUDAExecutionProvider" not in self.env.providers:
            return self.unavailable("tensorrt", f"its LLM stages run on ONNX Runtime CUDA: {install_command('gpu')}")
        if problem := provider_problem(self.env, "CUDAExecutionProvider"):
            return self.unavailable("tensorrt", f"its LLM stages run on ONNX Runtime CUDA: {problem}")
        try:
            pipe = Blip2Pipeline.from_artifacts(self.artifacts, backend="tensorrt", verify=False, threads=STRICT)
        except StaleEngineError as exc:
            return self.unavailable("tensorrt", f"{_one_line(exc)} (or doctor --build-engines)")
        try:
            entries = read_engine_manifest(Path(pipe.runners["vision"].name).parent / ENGINE_MANIFEST)["engines"]
            tf32 = tf32_stages(entries)
            why = (f"the {' and '.join(tf32)} engines were built with TF32: rebuild them with 'blip2-edge build-engines "
                   f"{self.artifacts} --no-tf32' (or doctor --build-engines) for a token-exact check") if tf32 else None
            batches = (1, pipe.runners["vision"].max_batch or 1, (pipe.runners["vision"].max_batch or 1) + 1)
            return self.compare("tensorrt", pipe, stage_cosines(self.cpu, pipe, self.images, batches), why)
        finally:
            pipe.close()

    def onnxruntime_trt(self) -> Check:
        from runtime.backends.tensorrt.engines import nvidia_device, ort_trt_cache_dir
        from runtime.pipeline import Blip2Pipeline

        if "TensorrtExecutionProvider" not in self.env.providers:
            return self.unavailable("onnxruntime-trt", f"ONNX Runtime has no TensorRT provider: {install_command('gpu')} "
                                                       "and TensorRT's libraries")
        # Listed is not loadable (libnvinfer.so.10 off the loader path, TensorRT 11): a skip with the fix.
        if problem := provider_problem(self.env, "TensorrtExecutionProvider"):
            return self.unavailable("onnxruntime-trt", problem)
        cache = ort_trt_cache_dir(self.artifacts, self.env.onnxruntime, nvidia_device())
        earlier = engine_files(cache_snapshot(cache))  # engines an earlier run built, maybe with TF32
        # The pipeline refuses a session that fell back from TensorRT (a one-line error).
        pipe = Blip2Pipeline.from_artifacts(self.artifacts, backend="onnxruntime-trt", verify=False, threads=STRICT)
        why = None
        if earlier or os.environ.get(TF32_OVERRIDE) != "0":
            why = (f"its engines may use TF32 ({len(earlier)} cached by an earlier run in {cache}: delete that folder "
                   "and run doctor again)" if earlier else f"its engines may use TF32 ({TF32_OVERRIDE} is not 0)")
        check = self.compare("onnxruntime-trt", pipe, tf32=why)
        if check.status != PASS:
            return check
        before = cache_snapshot(cache)
        if not engine_files(before):
            return Check("onnxruntime-trt", FAIL, f"the TensorRT provider wrote no engine into its cache {cache}, "
                                                  "so whether it builds each stage once cannot be shown")
        pipe.caption(self.images[:1], max_new_tokens=MAX_NEW_TOKENS * 2)  # longer: new past lengths
        changes = cache_changes(before, cache_snapshot(cache))
        if changes:
            return Check("onnxruntime-trt", FAIL, f"the TensorRT provider built engines again for longer decoder "
                                                  f"inputs ({', '.join(changes[:4])} in {cache}): its profile is "
                                                  "too small")
        return Check("onnxruntime-trt", PASS, f"{check.detail}; no engine built again for longer decoder inputs "
                                              f"({len(engine_files(before))} cached engines unchanged)")
