"""`blip2-edge caption` / `ask`: inputs, bad images, output formats, exit status."""

from __future__ import annotations

import json

import numpy as np

from PIL import Image

from runtime import synthetic
from tests.conftest import run_cli


def write_scenes(folder, n, seed=21):
    folder.mkdir(parents=True, exist_ok=True)
    scenes = synthetic.make_scenes(n, seed=seed)
    for i, (_, im) in enumerate(scenes):
        im.save(folder / f"img{i}.png")
    return [s for s, _ in scenes]


def test_caption_directory_json(toy_artifacts, tmp_path):
    scenes = write_scenes(tmp_path / "imgs", 3)
    proc = run_cli("caption", toy_artifacts, tmp_path / "imgs", "--json", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [r["path"].rsplit("/", 1)[1] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert sum(r["text"] == s.caption for r, s in zip(rows, scenes)) >= 2
    assert all(r["tokens"] and r["timings"]["total"] > 0 for r in rows)


def test_ask_glob_and_stream(toy_artifacts, tmp_path):
    scenes = write_scenes(tmp_path / "imgs", 2)
    proc = run_cli("ask", toy_artifacts, str(tmp_path / "imgs" / "*.png"), "-q", "what colour is it?", "--stream")
    assert proc.returncode == 0, proc.stderr
    answers = [l.split(": ", 1)[1] for l in proc.stdout.splitlines()]
    assert answers == [s.colour for s in scenes]


def test_bad_images_are_reported_and_others_processed(toy_artifacts, tmp_path):
    write_scenes(tmp_path, 1)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "trunc.png")  # noise does not compress: cut mid-data
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx: past Pillow's decompression-bomb limit
    proc = run_cli("caption", toy_artifacts, tmp_path / "img0.png", tmp_path / "empty.png", tmp_path / "text.png",
                   tmp_path / "trunc.png", bomb, tmp_path / "missing.png")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 5 and "Traceback" not in proc.stderr
    for name, why in (("empty.png", "empty file"), ("text.png", "not an image"), ("trunc.png", "cannot decode"),
                      ("bomb.png", "too large"), ("missing.png", "no such file")):
        assert any(name in l and why in l for l in err), (name, err)
    assert len(proc.stdout.splitlines()) == 1 and "img0.png: " in proc.stdout


def test_bad_arguments(toy_artifacts, tmp_path):
    write_scenes(tmp_path, 1)
    proc = run_cli("caption", toy_artifacts, tmp_path / "img0.png", "--top-p", "2")
    assert proc.returncode == 2 and proc.stderr.startswith("error: top_p must be in (0, 1]")
    proc = run_cli("caption", tmp_path / "nope", tmp_path / "img0.png")
    assert proc.returncode == 2 and "not an artifact directory" in proc.stderr
    proc = run_cli("caption", toy_artifacts, tmp_path / "img0.png", "--device", "cuda")
    assert proc.returncode == 2 and "blip2-edge[gpu]" in proc.stderr
