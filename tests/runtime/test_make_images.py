"""`blip2-edge make-images DIR`: synthetic test images on disk, with their true captions."""

from __future__ import annotations

import pytest
from PIL import Image

from runtime.synthetic import make_scenes
from tests.conftest import run_cli


def test_writes_the_scenes_of_the_seed_and_prints_their_captions(tmp_path):
    out = tmp_path / "imgs"
    r = run_cli("make-images", out, "-n", "5", "--seed", "3", "--size", "96")
    assert r.returncode == 0, r.stderr
    scenes = make_scenes(5, seed=3, image_size=96)
    names = [f"scene-{i:03d}.png" for i in range(5)]
    assert sorted(p.name for p in out.iterdir()) == names  # nothing else, nothing partial
    assert r.stdout.splitlines() == [f"{out / n}\t{scene.caption}" for n, (scene, _) in zip(names, scenes)]
    for name, (_, image) in zip(names, scenes):
        with Image.open(out / name) as written:
            assert written.format == "PNG" and written.size == (96, 96)
            assert written.convert("RGB").tobytes() == image.tobytes()
    again = tmp_path / "again"
    assert run_cli("make-images", again, "-n", "5", "--seed", "3", "--size", "96").returncode == 0
    assert all((again / n).read_bytes() == (out / n).read_bytes() for n in names)  # same seed, same files


def test_an_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("make-images", "empty", "-n", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("empty/scene-000.png\t")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["scene-000.png", "scene-001.png"]


@pytest.mark.parametrize("args, words", [
    (["-n", "0"], "-n must be in [1, 10000]"),
    (["-n", "10001"], "-n must be in [1, 10000]"),
    (["--size", "8"], "--size must be in [16, 4096]"),
    (["--seed", "-1"], "--seed must be in"),
    (["USED"], "not empty"),
    (["FILE"], "exists and is not a directory"),
])
def test_bad_requests_are_one_line_and_change_nothing(tmp_path, args, words):
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.png").write_bytes(b"keep")
    (tmp_path / "file").write_text("keep")
    target = {"USED": used, "FILE": tmp_path / "file"}.get(args[0], tmp_path / "new")
    r = run_cli("make-images", target, *[a for a in args if a not in ("USED", "FILE")])
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "used"]
    assert [p.name for p in used.iterdir()] == ["mine.png"] and (tmp_path / "file").read_text() == "keep"
