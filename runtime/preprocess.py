"""Image loading and BLIP preprocessing with Pillow and numpy, identical to transformers'
`BlipImageProcessor`: convert to RGB, resize with Pillow's filter, rescale in float64 then
float32, normalise in float32, channels first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.errors import ImageError

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
RESAMPLE_NAMES = {int(v): k for k, v in RESAMPLE.items()}


@dataclass(frozen=True)
class Preprocessing:
    height: int
    width: int
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_manifest(cls, d: dict) -> "Preprocessing":
        return cls(d["size"][0], d["size"][1], d["resample"], d["rescale_factor"], tuple(d["mean"]), tuple(d["std"]))

    def to_manifest(self) -> dict:
        return {"size": [self.height, self.width], "resample": self.resample, "rescale_factor": self.rescale_factor,
                "mean": list(self.mean), "std": list(self.std), "convert_rgb": True, "channels": "first"}

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One image -> pixel values (3, H, W) float32."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        # Always resize, as transformers does: at the target size Pillow returns a plain copy.
        image = image.resize((self.width, self.height), resample=RESAMPLE[self.resample])
        x = (np.asarray(image).astype(np.float64) * self.rescale_factor).astype(np.float32)  # (H, W, 3)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def batch(self, images: list[Image.Image]) -> np.ndarray:  # -> (B, 3, H, W)
        return np.stack([self(im) for im in images])


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens and decodes an image file, or raises an ImageError naming it."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(f"{path}: empty file")
        with Image.open(path) as im:
            im.load()
            return im
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused, image too large ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: cannot decode image ({' '.join(str(exc).split())})") from None
