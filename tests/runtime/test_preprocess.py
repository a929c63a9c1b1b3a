"""pixel_values identical to transformers' BlipImageProcessor for every Pillow mode and size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import BlipImageProcessor

from runtime.preprocess import Preprocessing

MODES = ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "1", "I", "F"]
SIZES = [(1, 1), (3, 1), (1, 3), (7, 5), (224, 224), (640, 480), (4000, 3000)]


def make_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5, 300, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-10, 300, (h, w)).astype(np.float32))
    base = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if mode == "P":
        return base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    return base.convert(mode)


@pytest.fixture(scope="module")
def processors():
    ours = Preprocessing(224, 224)
    theirs = BlipImageProcessor(size={"height": 224, "width": 224}, image_mean=list(ours.mean),
                                image_std=list(ours.std))
    return ours, theirs


def reference(theirs, image):
    # channels_last is stated explicitly: transformers guesses the channel axis from the shape,
    # and guesses wrong for images 1 or 3 pixels tall.
    return theirs(image, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode(processors, mode):
    ours, theirs = processors
    image = make_image(mode, (37, 23))
    got = ours(image)
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(theirs, image.convert("RGB")), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_every_size(processors, size):
    ours, theirs = processors
    image = make_image("RGB", size, seed=size[0])
    np.testing.assert_allclose(ours(image), reference(theirs, image), atol=1e-5, rtol=0)


def test_modes_match_transformers_own_conversion(processors):
    """transformers converts non-RGB images itself; for the 8-bit modes its path is ours."""
    ours, theirs = processors
    for mode in ("RGBA", "LA", "L", "P", "CMYK", "1"):
        image = make_image(mode, (50, 40), seed=3)
        np.testing.assert_allclose(ours(image), reference(theirs, image), atol=1e-5, rtol=0)
