"""transformers' own `generate` timed on the same image batches and settings as the profiler, so
the speedup a user gets is measured in the same run.

The profiler hands the batches in and summarizes the times itself: this module knows nothing
of the profiler (the runtime may load it for `profile --reference`; it must not load it back).
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

from exporter.loading import LoadOptions, load_model


def time_reference(model: str, batches: Iterable[Sequence], prompt: str, new_tokens: int, warmup: int,
                   compile: bool = False) -> dict:
    """End-to-end time (processor + generate) of each batch after the first `warmup`, for the
    PyTorch model, eager or torch.compile'd. Returns model, mode, times (seconds) and
    torch_threads."""
    import torch

    hf_model, processor = load_model(model, LoadOptions())
    if compile:
        hf_model.language_model.forward = torch.compile(hf_model.language_model.forward)
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        inputs = processor(images=list(batch), text=[prompt] * len(batch), return_tensors="pt", padding=True)
        with torch.no_grad():
            hf_model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, num_beams=1)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"model": model, "mode": "compiled" if compile else "eager", "times": times,
            "torch_threads": torch.get_num_threads()}
