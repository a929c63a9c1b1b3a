"""Photo folders for the photo-index tests: synthetic scenes written as real image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from runtime import synthetic
from runtime.index.db import EMBEDDING_DTYPE


def write_photos(folder: Path, n: int, seed: int = 5, size: int | None = None, fmt: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (_, im) in enumerate(synthetic.make_scenes(n, seed=seed)):
        if size:
            im = im.resize((size, size))
        path = folder / f"img{i:03d}.{fmt}"
        im.save(path)
        out.append(path)
    return out


def write_unreadable(folder: Path) -> list[Path]:
    """A text file with an image name, an empty one and a truncated PNG."""
    text = folder / "notes.jpg"
    text.write_text("not an image")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    trunc = folder / "trunc.png"
    Image.fromarray(noise).save(trunc)  # noise does not compress: cut mid-data
    trunc.write_bytes(trunc.read_bytes()[:400])
    return [text, empty, trunc]


def stored(db, path: Path) -> np.ndarray:
    """The float16 embedding the index holds for `path` (Q, D)."""
    import os

    row = db.conn.execute("SELECT i.embedding FROM files f JOIN images i ON i.id = f.image_id WHERE f.path = ?",
                          (os.fsencode(os.path.abspath(path)),)).fetchone()
    assert row is not None, f"{path} is not in the index"
    record = db.model()
    return np.frombuffer(row[0], EMBEDDING_DTYPE).reshape(record.num_query_tokens, record.dim)


def indexed_paths(db) -> set[str]:
    import os

    return {os.fsdecode(bytes(p)) for (p,) in db.conn.execute("SELECT path FROM files")}
