"""What the Python API accepts as images: PIL images, paths and uint8 arrays; everything else
is an ImageError naming the image and what is wrong, never a raw library error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime import synthetic
from runtime.errors import ImageError
from runtime.pipeline import Blip2Pipeline
from runtime.preprocess import ImageWarning


@pytest.fixture(scope="module")
def pipe(toy_artifacts):
    return Blip2Pipeline.from_artifacts(toy_artifacts)


@pytest.fixture(scope="module")
def scene():
    return synthetic.make_scenes(1, seed=5)[0]


def test_paths_arrays_and_pil_images_give_the_same_caption(pipe, scene, tmp_path):
    truth, image = scene
    image.save(tmp_path / "s.png")
    rgb = np.asarray(image.convert("RGB"))
    results = pipe.caption([image, str(tmp_path / "s.png"), tmp_path / "s.png", rgb, np.dstack([rgb, rgb[..., :1]])])
    assert [r.text for r in results] == [truth.caption] * 5


@pytest.mark.parametrize("single", ["x.png", "PATH", "PIL", "ARRAY"])
def test_a_single_image_instead_of_a_list_is_refused(pipe, scene, tmp_path, single):
    item = {"PATH": tmp_path / "x.png", "PIL": scene[1], "ARRAY": np.asarray(scene[1])}.get(single, single)
    for call in (lambda: pipe.caption(item), lambda: pipe.ask(item, "what colour is it?"),
                 lambda: pipe.generate(item, ["a photo of"])):
        with pytest.raises(ImageError, match=r"list of images.*\[image\]"):
            call()


@pytest.mark.parametrize("bad, why", [
    (np.zeros((32, 32, 3), np.float32), "dtype float32"),
    (np.zeros((32, 32, 3), np.float64), "dtype float64"),
    (np.zeros((32, 32, 3), np.uint16), "dtype uint16"),
    (np.zeros((4, 32, 32, 3), np.uint8), "shape (4, 32, 32, 3)"),
    (np.zeros((32, 32, 2), np.uint8), "shape (32, 32, 2)"),
    (np.zeros((0, 32, 3), np.uint8), "empty"),
    (Image.new("RGB", (0, 0)), "empty 0x0 image"),
    (b"\x89PNG", "bytes"),
    (None, "NoneType"),
])
def test_bad_images_name_the_index(pipe, scene, bad, why):
    with pytest.raises(ImageError) as err:
        pipe.caption([scene[1], bad])
    assert str(err.value).startswith("image 1: ") and why in str(err.value), str(err.value)


def test_missing_file_names_the_file(pipe, tmp_path):
    with pytest.raises(ImageError, match="nope.png"):
        pipe.caption([tmp_path / "nope.png"])


def test_pixel_limit_applies_to_files(pipe, scene, tmp_path):
    scene[1].save(tmp_path / "s.png")
    pixels = scene[1].width * scene[1].height
    limited = Blip2Pipeline.from_artifacts(pipe.manifest.root)
    limited.max_image_pixels = pixels - 1
    with pytest.raises(ImageError, match="s.png.*over the limit"):
        limited.caption([tmp_path / "s.png"])
    limited.max_image_pixels = pixels
    assert limited.caption([tmp_path / "s.png"])[0].text == scene[0].caption


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_modes_are_captioned_with_a_warning_naming_the_image(pipe, mode):
    deep = Image.fromarray(np.full((40, 40), 40000, np.uint16)).convert(mode)
    with pytest.warns(ImageWarning, match=f"image 0: mode {mode}"):
        result = pipe.caption([deep])[0]
    assert isinstance(result.text, str)
