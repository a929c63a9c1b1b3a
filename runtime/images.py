"""Which files count as images when a folder is given (caption, ask, profile, quantize)."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def image_files(folder: Path) -> list[Path]:
    """Files under `folder` (recursively) with an image suffix, in a stable (sorted) order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
