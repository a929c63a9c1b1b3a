"""Calibration and held-out images: an image folder, or the synthetic scene generator.

Images stream in batches through the runtime's own preprocessing; nothing holds all of them.
The held-out images used by the fidelity report are never among the calibration images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from runtime import synthetic
from runtime.errors import Blip2EdgeError, ImageError
from runtime.images import IMAGE_SUFFIXES, image_files
from runtime.preprocess import load_image

MIN_HELD_OUT = 8


@dataclass
class ImageSource:
    """Where calibration images come from, as recorded in the quantized manifest."""

    kind: str  # "folder" | "synthetic"
    calibration: list  # paths (folder) or (Scene, Image) pairs (synthetic)
    held_out: list
    seed: int
    location: str = ""
    skipped: int = 0  # unreadable files passed over
    selection_sha256: str = ""  # folders: which files were chosen, as they were (selection_digest)
    scenes: list = field(default_factory=list)  # ground truth of the held-out synthetic images

    def describe(self) -> dict:
        """As recorded in the quantized manifest."""
        out = {"source": self.kind, "location": self.location, "count": len(self.calibration),
               "held_out": len(self.held_out), "seed": self.seed, "skipped_unreadable": self.skipped}
        if self.kind == "folder":
            out["selection_sha256"] = self.selection_sha256
        return out

    def calibration_identity(self) -> dict:
        """What determines the calibration images (not the held-out ones): the key that ties
        cached activation ranges to the images that produced them."""
        out = {"source": self.kind, "location": self.location, "count": len(self.calibration), "seed": self.seed}
        if self.kind == "folder":
            out["selection_sha256"] = self.selection_sha256
        return out

    def _image(self, item) -> Image.Image:
        return item[1] if self.kind == "synthetic" else load_image(item)

    def calibration_batches(self, batch_size: int) -> Iterator[list[Image.Image]]:
        for start in range(0, len(self.calibration), batch_size):
            yield [self._image(x) for x in self.calibration[start:start + batch_size]]

    def held_out_images(self) -> list[Image.Image]:
        return [self._image(x) for x in self.held_out]


def synthetic_source(n: int, seed: int, held_out: int = 64) -> ImageSource:
    calib = synthetic.make_scenes(n, seed=seed)
    held = synthetic.make_scenes(held_out, seed=seed + 1_000_003)  # a disjoint stream of scenes
    return ImageSource("synthetic", calib, held, seed, location="runtime.synthetic",
                       scenes=[s for s, _ in held])


def selection_digest(root: Path, paths: list[Path]) -> str:
    """The chosen files: path relative to the folder, size and mtime of each, in order."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def folder_source(folder: Path, n: int, seed: int, held_out: int = 64) -> ImageSource:
    """Samples `n` readable images (deterministic for a seed), then up to `held_out` more."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Blip2EdgeError(f"{folder}: not a directory")
    paths = image_files(folder.resolve())  # absolute, so the selection digest is relative to `location`
    if not paths:
        raise Blip2EdgeError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found, searched recursively")
    order = np.random.default_rng(seed).permutation(len(paths))
    readable, skipped = [], 0
    for i in order:
        if len(readable) == n + held_out:
            break
        try:
            load_image(paths[i])  # decode once to skip broken files up front
            readable.append(paths[i])
        except ImageError:
            skipped += 1
    if len(readable) < n + MIN_HELD_OUT:
        raise Blip2EdgeError(
            f"{folder}: {len(readable)} readable images ({skipped} unreadable skipped); need --num-calib {n} "
            f"plus at least {MIN_HELD_OUT} held out for the fidelity report"
        )
    root = folder.resolve()
    return ImageSource("folder", readable[:n], readable[n:], seed, location=str(root), skipped=skipped,
                       selection_sha256=selection_digest(root, readable[:n]))
