"""Bad inputs to `blip2-edge quantize` and to the calibration image loader."""

from __future__ import annotations

import pytest
from PIL import Image

from calibration.quantize import QuantizeOptions, quantize
from calibration.sources import folder_source
from runtime.errors import Blip2EdgeError
from tests.conftest import run_cli
from tests.exporter.test_export_errors import assert_one_line_error


def test_already_quantized_is_refused(toy_artifacts, tmp_path):
    quantize(toy_artifacts, tmp_path / "q", QuantizeOptions(num_calib=8, held_out=20, gate=False), log=lambda s: None)
    assert_one_line_error(run_cli("quantize", tmp_path / "q", tmp_path / "qq", "--synthetic", "8"), "already quantized")


def test_out_dir_exists(toy_artifacts, tmp_path):
    (tmp_path / "q").mkdir()
    assert_one_line_error(run_cli("quantize", toy_artifacts, tmp_path / "q", "--synthetic", "8"), "already exists")


def test_empty_folder(toy_artifacts, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("no images here")
    assert_one_line_error(run_cli("quantize", toy_artifacts, tmp_path / "q", "--images", tmp_path / "imgs"),
                          "no images")


def test_too_few_images(toy_artifacts, tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    assert_one_line_error(run_cli("quantize", toy_artifacts, tmp_path / "q", "--images", tmp_path / "imgs",
                                  "--num-calib", "10"), "5 readable images", "--num-calib 10")


def test_bad_method_and_missing_artifacts(toy_artifacts, tmp_path):
    proc = run_cli("quantize", toy_artifacts, tmp_path / "q", "--method", "magic")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert_one_line_error(run_cli("quantize", tmp_path / "nope", tmp_path / "q"), "not an artifact directory")


def test_folder_loader_is_recursive_deterministic_and_skips_unreadable(tmp_path):
    for sub in ("a", "b/c"):
        (tmp_path / sub).mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(tmp_path / ("a" if i % 2 else "b/c") / f"{i}.{'png' if i % 3 else 'bmp'}")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "a" / "empty.webp").write_bytes(b"")
    one = folder_source(tmp_path, 10, seed=3, held_out=20)
    two = folder_source(tmp_path, 10, seed=3, held_out=20)
    other = folder_source(tmp_path, 10, seed=4, held_out=20)
    assert one.calibration == two.calibration and one.calibration != other.calibration
    assert len(one.calibration) == 10 and len(one.held_out) == 10
    assert not set(one.calibration) & set(one.held_out)
    assert one.skipped == 2 and one.describe()["skipped_unreadable"] == 2
    with pytest.raises(Blip2EdgeError, match="need --num-calib 19"):
        folder_source(tmp_path, 19, seed=0)
