"""`profile --reference`: transformers' own `generate`, timed on the same image batches and
settings as the profiler, in a process of its own (`python -m exporter.reference SPEC`), so that
the torch-free runtime never imports the exporter or torch. The batches travel as image files
(synthetic images as lossless PNGs) in a JSON spec; the times come back as JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from runtime.errors import Blip2EdgeError
from runtime.profiling.profiler import batches


def time_reference(model: str, images: Sequence, batch_size: int, count: int, prompt: str, new_tokens: int,
                   warmup: int, compile: bool = False) -> dict:
    """Times of the runs after `warmup` (exporter.reference.time_reference's dict)."""
    with tempfile.TemporaryDirectory(prefix="blip2edge-reference-") as tmp:
        files = []
        for i, image in enumerate(images):
            if isinstance(image, (str, os.PathLike)):
                files.append(str(image))
            else:
                path = Path(tmp) / f"{i}.png"
                image.save(path)
                files.append(str(path))
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"model": model, "batches": list(batches(files, batch_size, count)),
                                    "prompt": prompt, "new_tokens": new_tokens, "warmup": warmup,
                                    "compile": compile}))
        proc = subprocess.run([sys.executable, "-m", "exporter.reference", str(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise Blip2EdgeError(f"--reference {model}: {lines[-1].removeprefix('error: ')}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
