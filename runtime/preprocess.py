"""Image loading and BLIP preprocessing with Pillow and numpy, identical to transformers'
`BlipImageProcessor`: convert to RGB, resize with Pillow's filter, rescale in float64 then
float32, normalise in float32, channels first.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.artifact.verified_files import file_kind
from runtime.errors import ImageError, OptionError

# Images given as files are refused above this many pixels before they are decoded: a 12000x12000
# PNG of one colour is a few hundred KB on disk and 432 MB decoded. Pillow's own bomb limit (~179 Mpx) is
# meant for desktops; 8192x8192 is plenty for a model that sees 224x224.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
# Modes whose values do not fit in 8 bits: Pillow's convert("RGB"), which transformers'
# BlipImageProcessor uses too, clips each value to 0-255.
WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class ImageWarning(UserWarning):
    """An image is processed as transformers would, but probably not as its owner meant."""


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

    def resize(self, image: Image.Image) -> Image.Image:
        """Convert to RGB and resize to the model's input size: the only steps that need the
        full-size image. Preprocessing the result gives exactly the pixel values the original
        gives (resizing to the size an image already has is a plain copy), so a caller can drop
        the full-size image as soon as it is decoded."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size == (self.width, self.height):
            # transformers' BlipImageProcessor always resizes, but Pillow's resize to the size an
            # image already has returns `self.copy()` before any filter runs: skipping it gives
            # the same pixels (tests/runtime/test_preprocess.py) without the copy.
            return image
        return image.resize((self.width, self.height), resample=RESAMPLE[self.resample])

    def load(self, source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
             name: str | None = None) -> Image.Image:
        """The one image loader: decodes a file (or the encoded bytes of one) within the pixel
        limit (load_image) and shrinks it to the model's input size at once, so that a batch
        holds small images, never full-size ones."""
        return self.resize(load_image(source, max_pixels, name))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One image -> pixel values (3, H, W) float32."""
        image = self.resize(image)
        x = (np.asarray(image).astype(np.float64) * self.rescale_factor).astype(np.float32)  # (H, W, 3)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def batch(self, images: list[Image.Image]) -> np.ndarray:  # -> (B, 3, H, W)
        return np.stack([self(im) for im in images])


def check_max_pixels(max_pixels, name: str = "max_image_pixels") -> int:
    """The pixel limit, validated: a positive integer no larger than Pillow's own bomb limit,
    which Pillow enforces whatever we allow."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise OptionError(f"{name} must be a positive integer, got {max_pixels!r}")
    pillow = Image.MAX_IMAGE_PIXELS
    if pillow is not None and max_pixels > 2 * pillow:
        raise OptionError(f"{name} must be at most {2 * pillow} (Pillow's decompression-bomb limit), "
                          f"got {max_pixels}")
    return int(max_pixels)


def warn_if_wide(image: Image.Image, name: str) -> None:
    """Warns that a 16-bit, 32-bit or float image will be clipped to 8 bits (kept for parity)."""
    if image.mode in WIDE_MODES:
        warnings.warn(
            f"{name}: mode {image.mode} is converted to RGB by clipping every value to 0-255, as transformers' "
            "BlipImageProcessor does; a 16-bit or float image usually becomes one flat colour "
            "(convert it to 8-bit RGB first)", ImageWarning, stacklevel=3)


def load_image(path: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               name: str | None = None) -> Image.Image:
    """Opens and decodes an image file, or the encoded bytes of one (a server's request), or
    raises an ImageError naming it (`name`, else the path).

    Images over `max_pixels` are refused from their header, before any pixel is decoded.
    Warns (ImageWarning) when the image has more than 8 bits per channel.
    """
    max_pixels = check_max_pixels(max_pixels)
    encoded = isinstance(path, (bytes, bytearray, memoryview))
    source = io.BytesIO(path) if encoded else path
    if name is None:
        name = "image bytes" if encoded else str(path)
    path = name  # the messages below name it
    try:
        if not encoded and not stat.S_ISREG(mode := os.stat(source).st_mode):  # /dev/zero, a FIFO: never read
            raise ImageError(f"{path}: not an image file but {file_kind(mode)}")
        if (len(source.getbuffer()) if encoded else os.path.getsize(source)) == 0:
            raise ImageError(f"{path}: empty file")
        with Image.open(source) as im:  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: refused, {w}x{h} ({w * h / 1e6:.1f} Mpx) is over the limit of "
                                 f"{max_pixels / 1e6:.1f} Mpx (raise it with --max-image-pixels / max_image_pixels)")
            im.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused, image too large ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: cannot decode image ({' '.join(str(exc).split())})") from None
    warn_if_wide(im, name)
    return im


def image_from_array(array: np.ndarray, name: str) -> Image.Image:
    """A uint8 array (H, W) or (H, W, 1|3|4), channels last -> a PIL image, or an ImageError
    naming the image and what is wrong."""
    shape = tuple(array.shape)
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: numpy array of dtype {array.dtype}; expected uint8 (values 0-255)")
    if not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))):
        raise ImageError(f"{name}: numpy array of shape {shape}; expected (H, W) or (H, W, C) with C = 1, 3 or 4 "
                         "(channels last)")
    if array.size == 0:
        raise ImageError(f"{name}: empty numpy array of shape {shape}")
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]  # greyscale; Image.fromarray refuses a channel axis of 1
    return Image.fromarray(array)
