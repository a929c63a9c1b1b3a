"""Image inputs: which files count as images when a folder is given (caption, ask, profile,
quantize, index), and one API input (a path, a PIL image, a uint8 array) -> a PIL image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from runtime.errors import ImageError
from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS, Preprocessing, image_from_array, warn_if_wide

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]  # arrays: (H, W, 3) or (H, W) uint8


def image_files(folder: Path) -> list[Path]:
    """Files under `folder` (recursively) with an image suffix, in a stable (sorted) order."""
    return walk_image_files(folder)[0]


def walk_image_files(folder: Path) -> tuple[list[Path], list[tuple[Path, OSError]]]:
    """image_files, and the folders under `folder` (itself included) that could not be listed,
    with why: a walk that skipped them silently would take their images for deleted ones.
    Symbolic links to folders are not followed (as Path.rglob)."""
    found, unreadable = [], []
    for top, _, names in os.walk(folder, onerror=lambda exc: unreadable.append((Path(exc.filename), exc))):
        found += [Path(top, n) for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES and Path(top, n).is_file()]
    return sorted(found), sorted(unreadable, key=lambda u: u[0])


def image_batch(images) -> Sequence[ImageInput]:
    """The `images` argument of caption/ask/generate must be a sequence of images: a single
    image (a path string, a PIL image, an array) is refused rather than iterated over."""
    if isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray)):
        raise ImageError(f"images must be a list of images, got a single {type(images).__name__}; "
                         "pass [image] for one image")
    return images


def as_image(item: ImageInput, index: int, preprocessing: Preprocessing,
             max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """One input -> a PIL image, or an ImageError naming it. A file is resized to the model's
    input size as soon as it is decoded, so a batch holds small images, never full-size ones
    (preprocessing the small image gives the same pixel values)."""
    name = f"image {index}"
    if isinstance(item, Image.Image):
        if item.width == 0 or item.height == 0:
            raise ImageError(f"{name}: empty {item.width}x{item.height} image")
        warn_if_wide(item, name)
        return item
    if isinstance(item, np.ndarray):
        image = image_from_array(item, name)
        warn_if_wide(image, name)
        return image
    if isinstance(item, (str, os.PathLike)):
        return preprocessing.load(item, max_pixels)
    raise ImageError(f"{name}: a {type(item).__name__}; expected a file path, a PIL image or a uint8 numpy array")
