"""`blip2-edge make-images DIR`: a folder of synthetic test images (runtime.synthetic: one
textured square on a varied background each), with each image's true caption printed, to
caption, index, search or send to a server where no photos are at hand."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.cli.generate import _integer
from runtime.errors import Blip2EdgeError, OptionError

MAX_IMAGES = 10_000
SIZES = (16, 4096)


def register(sub) -> None:
    p = sub.add_parser("make-images", help="write a folder of synthetic test images (PNG, a coloured square each)",
                       description="Write N synthetic PNG images (one textured square on a varied background each: "
                                   "the scenes the toy model knows) into DIR, and print each file with its true "
                                   "caption. The same seed writes the same images.")
    p.add_argument("out", metavar="DIR", help="the folder to write (absent, or an empty directory)")
    p.add_argument("-n", "--count", type=_integer, default=8, metavar="N", help="how many images (default 8)")
    p.add_argument("--seed", type=_integer, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=_integer, default=128, metavar="PX",
                   help="side of each square image in pixels (default 128)")
    p.set_defaults(run=run)


def _check(args) -> None:
    if not 1 <= args.count <= MAX_IMAGES:
        raise OptionError(f"-n must be in [1, {MAX_IMAGES}], got {args.count}")
    if not SIZES[0] <= args.size <= SIZES[1]:
        raise OptionError(f"--size must be in [{SIZES[0]}, {SIZES[1]}] pixels, got {args.size}")
    if not 0 <= args.seed < 2**63:
        raise OptionError(f"--seed must be in [0, 2**63), got {args.seed}")


def _write(folder: Path, names: list[str], args) -> list[str]:
    """Each image under a temporary name, renamed when complete; returns the captions."""
    from runtime.synthetic import make_scenes

    captions = []
    for name, (scene, image) in zip(names, make_scenes(args.count, seed=args.seed, image_size=args.size)):
        tmp = folder / f".{name}.partial"
        image.save(tmp, "PNG")
        os.replace(tmp, folder / name)
        captions.append(scene.caption)
    return captions


def run(args) -> int:
    from runtime.artifact.writer import atomic_directory

    _check(args)
    out = Path(args.out)
    width = max(3, len(str(args.count - 1)))
    names = [f"scene-{i:0{width}d}.png" for i in range(args.count)]
    if os.path.lexists(out):
        if not out.is_dir() or out.is_symlink():
            raise Blip2EdgeError(f"{out}: exists and is not a directory; name a new folder")
        try:
            empty = not any(out.iterdir())
        except OSError as exc:
            raise Blip2EdgeError(f"{out}: cannot list it ({exc.strerror or exc})") from None
        if not empty:
            raise Blip2EdgeError(f"{out}: not empty; name a new or empty folder")
        try:
            captions = _write(out, names, args)
        except OSError as exc:
            raise Blip2EdgeError(f"{out}: cannot write images there ({exc.strerror or exc})") from None
    else:
        with atomic_directory(out, overwrite=False) as tmp:
            captions = _write(tmp, names, args)
    for name, caption in zip(names, captions):
        print(f"{out / name}\t{caption}")
    return 0
