"""`blip2-edge match`: how well each text fits an image, from a retrieval artifact.

    blip2-edge match out/itm img.jpg "a dog on a sofa" "a cat on a sofa" [--json]

Prints, per text, the ITM match probability (softmax of the ITM head, index 1) and the ITC
score (cosine of the best query token, transformers' logits_per_image).
"""

from __future__ import annotations

import json
import warnings

from runtime.cli.generate import _integer, add_thread_options, text_argument, thread_settings
from runtime.errors import OptionError


def register(sub) -> None:
    helptext = "ITM match probabilities (and ITC scores) of texts for an image"
    p = sub.add_parser("match", help=helptext, description=helptext)
    p.add_argument("artifacts", help="retrieval artifact directory (an exported Blip2ForImageTextRetrieval)")
    p.add_argument("image", help="image file")
    p.add_argument("texts", nargs="+", help="texts to match against the image")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--max-image-pixels", type=_integer, metavar="N", default=None,
                   help="refuse an image file over N pixels before decoding it (default: 8192x8192)")
    add_thread_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from PIL import Image

    from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels
    from runtime.retriever import Blip2Retriever, similarity

    max_pixels = check_max_pixels(
        DEFAULT_MAX_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels, "--max-image-pixels")
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    texts = [text_argument(t, f"text {i}") for i, t in enumerate(args.texts)]
    for i, text in enumerate(texts):
        if not text.strip():  # as `search` refuses an empty query
            raise OptionError(f"text {i} is empty")
    retriever = Blip2Retriever.from_artifacts(args.artifacts, device=args.device, threads=thread_settings(args))
    retriever.encode_texts(texts)  # a text the model cannot take fails before the image is read
    image = retriever.preprocessing.load(args.image, max_pixels)
    vision = retriever.vision_embeds([image])
    itm = retriever.itm_from_vision(vision, texts)[0]
    itc = similarity(retriever.embed_images_from_vision(vision), retriever.embed_texts(texts))[0]
    if args.json:
        print(json.dumps({"image": args.image, "artifact_sha256": retriever.artifact_sha256,
                          "matches": [{"text": t, "itm": float(p), "itc": float(s)}
                                      for t, p, s in zip(texts, itm, itc)]}))
    else:
        print(f"{args.image}:")
        for t, p, s in zip(texts, itm, itc):
            print(f"  ITM {p:.4f}  ITC {s:+.4f}  {t}")
    return 0
