"""transformers' own `generate` timed on the same images and settings as the profiler, so the
speedup a user gets is measured in the same run."""

from __future__ import annotations

import time
from typing import Sequence

from exporter.loading import LoadOptions, load_model
from runtime.profiling.profiler import ProfileOptions, batches
from runtime.profiling.stats import summarize


def profile_reference(model: str, images: Sequence, opts: ProfileOptions, compile: bool = False) -> dict:
    """End-to-end timing (processor + generate) of the PyTorch model, eager or torch.compile'd."""
    import torch

    hf_model, processor = load_model(model, LoadOptions())
    if compile:
        hf_model.language_model.forward = torch.compile(hf_model.language_model.forward)
    prompt = opts.prompt or ""
    times = []
    for i, batch in enumerate(batches(images, opts.batch_size, opts.warmup + opts.runs)):
        t0 = time.perf_counter()
        inputs = processor(images=list(batch), text=[prompt] * len(batch), return_tensors="pt", padding=True)
        with torch.no_grad():
            hf_model.generate(**inputs, max_new_tokens=opts.new_tokens, min_new_tokens=opts.new_tokens,
                              do_sample=False, num_beams=1)
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    return {"model": model, "mode": "compiled" if compile else "eager", "end_to_end": summarize(times),
            "torch_threads": torch.get_num_threads()}
