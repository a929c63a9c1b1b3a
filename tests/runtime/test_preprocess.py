"""pixel_values identical to transformers' BlipImageProcessor for every Pillow mode and size; image
files, arrays and the pixel limit refused with errors that name them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from transformers import BlipImageProcessor

from runtime.errors import ImageError, OptionError
from runtime.preprocess import ImageWarning, Preprocessing, check_max_pixels, image_from_array, load_image

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


# ---- shrinking at decode time, pixel limit, arrays, wide modes ----------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_resize_first_gives_identical_pixels(processors, mode):
    """The CLI and the pipeline keep only `resize(image)` per batch item: preprocessing it must
    give exactly the values the full-size image gives."""
    ours, _ = processors
    for size in ((37, 23), (640, 480), (224, 224)):
        image = make_image(mode, size, seed=size[0])
        np.testing.assert_array_equal(ours(ours.resize(image)), ours(image))


@pytest.mark.parametrize("mode", MODES)
def test_an_image_at_model_size_is_not_resized_and_keeps_parity(processors, mode):
    """transformers always resizes; at the size an image already has, Pillow's resize is a copy,
    so skipping it must give the very pixels the copy has, for every mode."""
    ours, theirs = processors
    image = make_image(mode, (224, 224), seed=7)
    rgb = image.convert("RGB")
    assert ours.resize(rgb) is rgb  # skipped
    resized = rgb.resize((224, 224), resample=Image.Resampling.BICUBIC)  # what transformers runs
    np.testing.assert_array_equal(np.asarray(ours.resize(image)), np.asarray(resized))
    np.testing.assert_allclose(ours(image), reference(theirs, rgb), atol=1e-5, rtol=0)
    other = Preprocessing(224, 224, resample="nearest")
    np.testing.assert_array_equal(other(image), ours(image))  # no filter ran, whichever is named


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ImageError) as err:
        load_image(path, max_pixels=59_999)
    assert str(path) in str(err.value) and "300x200" in str(err.value) and "--max-image-pixels" in str(err.value)
    assert load_image(path, max_pixels=60_000).size == (300, 200)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100", 10**12])
def test_pixel_limit_values(bad):
    with pytest.raises(OptionError, match="--max-image-pixels"):
        check_max_pixels(bad, "--max-image-pixels")


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_modes_warn_naming_the_file_and_keep_parity(processors, tmp_path, mode):
    ours, theirs = processors
    path = tmp_path / f"deep_{mode.replace(';', '')}.tiff"
    make_image(mode, (20, 10)).save(path)
    with pytest.warns(ImageWarning, match=f"{path.name}.*mode {mode}"):
        image = load_image(path)
    np.testing.assert_allclose(ours(image), reference(theirs, image.convert("RGB")), atol=1e-5, rtol=0)


def test_eight_bit_modes_do_not_warn(tmp_path):
    path = tmp_path / "rgb.png"
    make_image("RGB", (20, 10)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(path)


@pytest.mark.parametrize("array, why", [
    (np.zeros((8, 8, 3), np.float32), "dtype float32"),
    (np.zeros((8, 8, 3), np.int64), "dtype int64"),
    (np.zeros((8, 8, 3), bool), "dtype bool"),
    (np.zeros((8,), np.uint8), "shape (8,)"),
    (np.zeros((2, 8, 8, 3), np.uint8), "shape (2, 8, 8, 3)"),
    (np.zeros((3, 8, 8), np.uint8), "shape (3, 8, 8)"),  # channels first
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    (np.zeros((8, 0), np.uint8), "empty"),
])
def test_bad_arrays_are_refused_naming_the_image(array, why):
    with pytest.raises(ImageError) as err:
        image_from_array(array, "image 3")
    assert str(err.value).startswith("image 3: ") and why in str(err.value)


def test_accepted_arrays(processors):
    ours, _ = processors
    grey = np.random.default_rng(0).integers(0, 256, (9, 7), dtype=np.uint8)
    assert image_from_array(grey, "g").mode == "L"
    np.testing.assert_array_equal(ours(image_from_array(grey[:, :, None], "g1")), ours(image_from_array(grey, "g")))
    assert image_from_array(np.zeros((9, 7, 3), np.uint8), "rgb").mode == "RGB"
    assert image_from_array(np.zeros((9, 7, 4), np.uint8), "rgba").mode == "RGBA"
