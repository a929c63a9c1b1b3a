"""`blip2-edge index` and `blip2-edge search`: the photo index from the command line."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from PIL import Image

from runtime.cli.durations import seconds
from runtime.cli.generate import _integer, text_argument
from runtime.cli.outputs import check_output_file
from runtime.cli.progress import Progress
from runtime.errors import ArtifactError, OptionError
from runtime.index import ann, exact
from runtime.index.db import IndexDb, IndexDbError
from runtime.index.indexer import update_index
from runtime.index.results_page import clock, write_results_page
from runtime.index.search import MODES, PhotoSearch, video_frame
from runtime.index.videos import DEFAULT_VIDEO_EVERY
from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels
from runtime.retriever import Blip2Retriever


def register(sub) -> None:
    p = sub.add_parser("index", help="embed a photo folder into a searchable index (only new or changed files)",
                       description="Embed the images under PHOTOS into the SQLite index --db with a retrieval "
                                   "artifact. Incremental: only new or changed files are embedded, moved files are "
                                   "not embedded again, deleted files are removed. Unreadable files are listed. "
                                   "Video files (with the video extra) are sampled at scene changes and each "
                                   "sampled frame is stored with its timestamp.")
    p.add_argument("artifacts", help="retrieval artifact directory (blip2-edge export of a Blip2ForImageTextRetrieval)")
    p.add_argument("photos", help="folder of images (recursive)")
    p.add_argument("--db", required=True, help="the index file (made if missing), e.g. photos.db")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--batch-size", type=_integer, default=16, help="images embedded (and committed) together")
    p.add_argument("--progress", action="store_true",
                   help="show the progress bar even when stderr is not a terminal (it is shown on a terminal)")
    p.add_argument("--ann-threshold", type=_integer, default=ann.DEFAULT_THRESHOLD, metavar="N",
                   help=f"build the approximate index for libraries of at least N images (default {ann.DEFAULT_THRESHOLD})")
    p.add_argument("--max-image-pixels", type=_integer, default=DEFAULT_MAX_IMAGE_PIXELS)
    p.add_argument("--allow-empty", action="store_true",
                   help="accept a PHOTOS folder with no image left and remove all its records (by default that is "
                        "refused: an unmounted drive looks the same)")
    p.add_argument("--video-every", type=seconds, default=DEFAULT_VIDEO_EVERY, metavar="S",
                   help=f"videos: sample a frame at least every S seconds besides scene changes (default "
                        f"{DEFAULT_VIDEO_EVERY:g}s)")
    p.set_defaults(run=run_index)

    p = sub.add_parser("search", help="find the indexed photos that best match a text",
                       description="Rank the photos of an index by BLIP-2 similarity to TEXT; --rerank K re-scores "
                                   "the best K with the image-text matching head.")
    p.add_argument("db", help="the index file written by 'blip2-edge index'")
    p.add_argument("text", help="what to look for, e.g. \"a red bicycle leaning on a wall\"")
    p.add_argument("--top", type=_integer, default=10, help="how many results (default 10)")
    p.add_argument("--rerank", type=_integer, default=0, metavar="K",
                   help="re-score the best K (>= --top) with the ITM head and order by match probability")
    p.add_argument("--model", help="the retrieval artifact directory (default: where the index records it)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="auto (default): the approximate index when the db has a current one, else exact")
    p.add_argument("--candidates", type=_integer, default=ann.DEFAULT_CANDIDATES,
                   help="approximate mode: images re-scored exactly per query")
    p.add_argument("--chunk", type=_integer, default=exact.DEFAULT_CHUNK, help="exact mode: images per chunk")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--html", type=Path, metavar="FILE",
                   help="also write the results as a self-contained HTML page (thumbnails, timestamps, scores)")
    p.set_defaults(run=run_search)


def _retriever(location: str) -> Blip2Retriever:
    return Blip2Retriever.from_artifacts(location)


def run_index(args) -> int:
    max_pixels = check_max_pixels(args.max_image_pixels, "--max-image-pixels")
    # --max-image-pixels is the check here (a refused image is listed with its file name); Pillow's
    # own warning above 89 Mpx, which names no file, would only repeat it.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if not Path(args.photos).is_dir():  # before loading the model
        raise OptionError(f"{args.photos}: not a directory (index takes the folder of photos)")
    retriever = _retriever(args.artifacts)
    show = args.progress or sys.stderr.isatty()
    progress = (lambda label, total: Progress(label, total, live=True if args.progress else None)) if show else None
    if args.video_every <= 0:
        raise OptionError(f"--video-every must be a positive duration, got {args.video_every:g} s")
    db = IndexDb.open(args.db, create=True)
    try:
        report = update_index(db, retriever, args.photos, args.artifacts, batch_size=args.batch_size,
                              max_pixels=max_pixels, ann_threshold=args.ann_threshold, progress=progress,
                              allow_empty=args.allow_empty, video_every=args.video_every)
    finally:
        db.close()
    for folder, reason in report.unreadable_folders:
        print(f"warning: {folder}: folder cannot be read ({reason}); what the index holds from it is kept",
              file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(f"{report.files} images in {report.root}: {report.embedded} embedded, {report.relinked} moved or copied "
          f"(not embedded again), {report.unchanged} unchanged, {report.removed} removed; "
          f"{report.images} images in {report.db}" + (f"; approximate index {report.ann}" if report.ann != "none" else "")
          + (f"; {report.kept} kept from folders that could not be read" if report.unreadable_folders else ""))
    if report.videos or report.videos_removed:
        print(f"{report.videos} videos: {report.videos_indexed} sampled and embedded ({report.video_frames} frames), "
              f"{report.videos_unchanged} unchanged, {report.videos_removed} removed")
    if report.unreadable:
        print(f"{len(report.unreadable)} unreadable (skipped):")
        for path, reason in report.unreadable:
            print(f"  {path}: {reason}")
    return 0


def run_search(args) -> int:
    text_argument(args.text, "TEXT")  # undecodable bytes on the command line, before any work
    if args.html is not None:
        check_output_file("--html", args.html)
    db = IndexDb.open(args.db)
    try:
        record = db.model()
        if record is None:
            raise IndexDbError(f"{args.db}: empty photo index (run `blip2-edge index MODEL PHOTOS --db {args.db}`)")
        location = args.model or record.location
        if not args.model and not os.path.isdir(location):
            raise ArtifactError(f"{args.db} was made with the model at {location}, which is not there any more: "
                                "pass its new place with --model DIR")
        searcher = PhotoSearch(db, _retriever(location), location, mode=args.mode, chunk=args.chunk,
                               candidates=args.candidates)
        hits = searcher.search(args.text, top=args.top, rerank=args.rerank)
    finally:
        db.close()
    if args.html is not None:
        write_results_page(args.html, args.text, hits, video_frame, DEFAULT_MAX_IMAGE_PIXELS)
    if args.json:
        print(json.dumps({"query": args.text, "mode": searcher.mode, "reranked": bool(args.rerank),
                          "results": [h.to_json() for h in hits]}, indent=2))
        return 0
    for rank, h in enumerate(hits, 1):
        itm = f"  match {h.itm:.3f}" if h.itm is not None else ""
        when = f" at {clock(h.timestamp)}" if h.timestamp is not None else ""
        print(f"{rank:>3}. {h.score:.4f}{itm}  {h.path}{when}")
    return 0
