"""Profiles one artifact directory with the pipeline's own stage timings (one clock).

Each run captions one batch with a forced number of new tokens, so runs and directories do the
same work; warm-up runs are excluded; the pipeline's stage clocks are the only timer.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from runtime.artifact.memory import artifact_weights
from runtime.backends.threads import ThreadSettings
from runtime.errors import OptionError
from runtime.pipeline import Blip2Pipeline, Result
from runtime.profiling.stats import duration_stats

STAGES = Result.STAGES  # every family's; a profile's own are its "stage_order" (T5 adds the encoder)


@dataclass(frozen=True)
class ProfileOptions:
    batch_size: int = 1
    new_tokens: int = 20
    runs: int = 10
    warmup: int = 2
    prompt: str | None = None
    device: str = "cpu"
    backend: str = "onnxruntime"
    threads: ThreadSettings = ThreadSettings()
    precision: str = "f32"  # OpenVINO's (backend "openvino")

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise OptionError(f"--runs must be >= 1, got {self.runs}")
        if self.warmup < 0:
            raise OptionError(f"--warmup must be >= 0, got {self.warmup}")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.new_tokens < 1:
            raise OptionError(f"--new-tokens must be >= 1, got {self.new_tokens}")


def batches(images: Sequence, batch_size: int, count: int):
    """`count` batches cycling through the images."""
    for i in range(count):
        yield [images[(i * batch_size + j) % len(images)] for j in range(batch_size)]


def load(path: Path, opts: ProfileOptions, engine: tuple[str, str] | None = None) -> Blip2Pipeline:
    """The pipeline of `path` on opts' backend and precision, or on `engine` (backend, precision)."""
    backend, precision = engine or (opts.backend, opts.precision)
    return Blip2Pipeline.from_artifacts(path, device=opts.device, backend=backend, threads=opts.threads,
                                        precision=precision)


def run_once(pipe: Blip2Pipeline, batch: list, opts: ProfileOptions) -> dict:
    """One forced-length generation of `batch`; its stage timings."""
    gen = dict(max_new_tokens=opts.new_tokens, min_new_tokens=opts.new_tokens, stop_strings=())
    return pipe.generate(batch, [pipe.caption_prompt(opts.prompt)] * len(batch), **gen)[0].timings


def profile_artifacts(path: Path, images: Sequence, opts: ProfileOptions) -> dict:
    """Returns per-stage statistics, throughput and the raw per-run timings."""
    pipe = load(path, opts)
    runs = []
    for i, batch in enumerate(batches(images, opts.batch_size, opts.warmup + opts.runs)):
        timings = run_once(pipe, batch, opts)
        if i >= opts.warmup:
            runs.append(timings)
    return summarize(path, pipe, runs, opts)


def engine_label(backend: str, precision: str) -> str:
    return backend if precision == "f32" else f"{backend}:{precision}"


def profile_interleaved(paths: Sequence[Path], engines: Sequence[tuple[str, str]], images: Sequence,
                        opts: ProfileOptions) -> list[dict]:
    """Every (directory, engine) pair loaded at once (engine: backend and precision), warmed up,
    then timed in interleaved rounds (each round runs every pipeline once, the order rotating),
    so that a change of load on the machine reaches them all alike; one profile per pair,
    labelled 'dir [backend:precision]'."""
    pairs = [(path, engine) for path in paths for engine in engines]
    pipes = [load(path, opts, engine) for path, engine in pairs]
    runs: list[list[dict]] = [[] for _ in pipes]
    count = opts.warmup + opts.runs
    all_batches = list(batches(images, opts.batch_size, count))
    for r, batch in enumerate(all_batches):
        order = list(range(len(pipes)))
        for i in order[r % len(order):] + order[:r % len(order)]:
            timings = run_once(pipes[i], batch, opts)
            if r >= opts.warmup:
                runs[i].append(timings)
    return [{**summarize(path, pipe, pipe_runs, opts), "backend": engine[0], "engine_precision": engine[1],
             "label": f"{Path(path).name} [{engine_label(*engine)}]"}
            for (path, engine), pipe, pipe_runs in zip(pairs, pipes, runs)]


def summarize(path: Path, pipe: Blip2Pipeline, runs: list[dict], opts: ProfileOptions) -> dict:
    order = pipe.timed_stages
    stages = {s: duration_stats(r[s] for r in runs) for s in order}
    stages["end_to_end"] = duration_stats(r["total"] for r in runs)
    stages["decode_step"] = duration_stats(t for r in runs for t in r["decode_steps"])
    mean_total = stages["end_to_end"]["mean"]
    manifest = pipe.manifest.data
    return {
        "artifacts": str(path),
        "llm_family": pipe.family.name,
        "architecture": pipe.family.architecture,
        # InstructBLIP's Q-Former reads the instruction too: its row is not BLIP-2's.
        "stage_inputs": {s: [t["name"] for t in manifest["stages"][s]["inputs"]] for s in ("vision", "qformer")},
        "precision": {s: manifest["stages"][s]["precision"] for s in pipe.stage_names},
        # How the decoder keeps its KV cache (exporter --kv-cache): it changes the decode step's cost.
        "kv_cache": pipe.model.get("kv_cache", "concat"),
        # Which engine ran each stage, on which device, in which precision (and why not the backend's).
        "placement": pipe.artifact.placement,
        "stage_order": list(order),
        "stages": stages,
        "tokens_per_s": opts.batch_size * opts.new_tokens / mean_total,
        "images_per_s": opts.batch_size / mean_total,
        "time_to_first_token": duration_stats(sum(r[s] for s in order[:order.index("prefill") + 1]) for r in runs),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weights": artifact_weights(pipe.manifest),  # bytes per stage from the files (runtime.artifact.memory)
        "runs": runs,
    }
