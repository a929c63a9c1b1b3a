"""`search --html`: the results as one self-contained HTML page (a contact sheet): each hit's
thumbnail inline as a base64 JPEG, its file, its timestamp for a video frame, its score. The page
makes no request of any kind (no external style, script, font or image), so it opens offline
and leaks nothing; it is written whole or not at all."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from runtime.artifact.atomic_file import replace_file
from runtime.errors import Blip2EdgeError
from runtime.preprocess import load_image

THUMBNAIL = 192  # pixels, the longer side

_STYLE = """
body { font: 14px/1.4 sans-serif; margin: 16px; background: #fff; color: #222; }
h1 { font-size: 18px; margin: 0 0 12px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.hit { width: 200px; border: 1px solid #ccc; padding: 4px; }
.hit img, .hit .missing { width: 192px; height: 192px; object-fit: contain; display: block; background: #eee; }
.hit .missing { color: #888; text-align: center; line-height: 192px; }
.name { word-break: break-all; font-size: 12px; }
.score { font-weight: bold; }
"""


# The browser itself refuses any request the page could make: only inline styles and data: images.
_NO_REQUESTS = ('<meta http-equiv="Content-Security-Policy" '
                'content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'">')


def clock(seconds: float) -> str:
    m, s = divmod(max(seconds, 0.0), 60)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


def thumbnail_uri(image: Image.Image) -> str:
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnail(hit, video_frame, max_pixels: int) -> str | None:
    try:
        image = video_frame(hit.path, hit.timestamp) if hit.timestamp is not None else load_image(hit.path, max_pixels)
        return thumbnail_uri(image)
    except (Blip2EdgeError, OSError):
        return None  # gone or changed since indexing: the hit is listed without its picture


def results_page(query: str, hits, video_frame, max_pixels: int) -> str:
    """The page's HTML; `video_frame(path, timestamp)` -> a PIL image of a video's frame."""
    cells = []
    for rank, hit in enumerate(hits, 1):
        uri = _thumbnail(hit, video_frame, max_pixels)
        picture = (f'<img src="{uri}" alt="result {rank}">' if uri
                   else '<div class="missing">not readable</div>')
        when = f' at <span class="time">{clock(hit.timestamp)}</span>' if hit.timestamp is not None else ""
        itm = f" · match {hit.itm:.3f}" if hit.itm is not None else ""
        cells.append(f'<div class="hit">{picture}<div>#{rank} <span class="score">{hit.score:.4f}</span>{itm}</div>'
                     f'<div class="name">{html.escape(hit.path)}{when}</div></div>')
    title = html.escape(query)
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{_NO_REQUESTS}<title>{title}</title>'
            f'<style>{_STYLE}</style></head><body><h1>{title}: {len(hits)} results</h1>'
            f'<div class="grid">{"".join(cells)}</div></body></html>\n')


def write_results_page(path: str | Path, query: str, hits, video_frame, max_pixels: int) -> None:
    replace_file(Path(path), results_page(query, hits, video_frame, max_pixels).encode("utf-8"))
