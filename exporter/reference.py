"""transformers' own `generate` timed on the same image batches and settings as the profiler, so
the speedup a user gets is measured in the same run.

The profiler runs this module in a process of its own (`python -m exporter.reference SPEC`,
runtime/profiling/reference.py): SPEC is a JSON file with the model, the batches of image
files, the prompt, new_tokens, warmup and compile; the result is one JSON line on stdout. The
profiler summarizes the times itself: this module knows nothing of the profiler.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Iterable, Sequence

from PIL import Image

from exporter.loading import LoadOptions, load_model
from runtime.errors import Blip2EdgeError


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = json.loads(open(argv[0], encoding="utf-8").read())
        batches = [[Image.open(path).convert("RGB") for path in batch] for batch in spec["batches"]]
        result = time_reference(spec["model"], batches, spec["prompt"], spec["new_tokens"], spec["warmup"],
                                compile=spec["compile"])
    except Blip2EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
