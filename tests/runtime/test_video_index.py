"""Videos in the photo index: sampled at scene changes, each frame stored with (file, timestamp);
`search` finds the moment; re-indexing does nothing for an unchanged video and re-embeds a
changed one; `--html` writes a self-contained page that a real browser (Debian's Chromium)
renders with its thumbnails."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("av")

from runtime import synthetic  # noqa: E402
from runtime.cli.main import main  # noqa: E402
from runtime.index import IndexDb, PhotoSearch, update_index  # noqa: E402
from runtime.retriever import Blip2Retriever  # noqa: E402
from runtime.video.synthetic_video import write_video  # noqa: E402
from tests.runtime.video_support import ALERT_SHOTS, CHANGES, FPS, SCENES, SHOTS  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def retriever(retrieval_toy_artifacts):
    return Blip2Retriever.from_artifacts(retrieval_toy_artifacts)


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "library"
    (root / "clips").mkdir(parents=True)
    write_video(root / "clips" / "scenes.mp4", SHOTS, fps=FPS)
    synthetic.render(synthetic.Scene("orange", "small", "bottom", "dotted"), np.random.default_rng(1)).save(
        root / "photo.png")
    return root


def _index(db_path, retriever, root, location):
    db = IndexDb.open(db_path, create=True)
    try:
        return update_index(db, retriever, root, location)
    finally:
        db.close()


def _search(db_path, retriever, location, text, top=1):
    db = IndexDb.open(db_path)
    try:
        return PhotoSearch(db, retriever, location).search(text, top=top)
    finally:
        db.close()


def test_search_finds_each_scene_at_its_timestamp(retriever, retrieval_toy_artifacts, library, tmp_path):
    report = _index(tmp_path / "i.db", retriever, library, retrieval_toy_artifacts)
    assert (report.files, report.embedded, report.videos, report.videos_indexed) == (1, 1, 1, 1)
    assert report.video_frames == len(SCENES)  # one frame per scene: sampled at the changes only
    video = str(library / "clips" / "scenes.mp4")
    for scene, start in zip(SCENES, [0.0, *CHANGES]):
        hit = _search(tmp_path / "i.db", retriever, retrieval_toy_artifacts, scene.caption)[0]
        assert hit.path == video and abs(hit.timestamp - start) <= 1 / FPS, (scene.caption, hit)
    photo = _search(tmp_path / "i.db", retriever, retrieval_toy_artifacts, "a small orange dotted square at the bottom")
    assert photo[0].path == str(library / "photo.png") and photo[0].timestamp is None


def test_reindexing_skips_an_unchanged_video_and_reembeds_a_changed_one(retriever, retrieval_toy_artifacts, library,
                                                                         tmp_path):
    db_path = tmp_path / "i.db"
    _index(db_path, retriever, library, retrieval_toy_artifacts)
    again = _index(db_path, retriever, library, retrieval_toy_artifacts)
    assert (again.videos_unchanged, again.videos_indexed, again.video_frames, again.embedded) == (1, 0, 0, 0)
    video = library / "clips" / "scenes.mp4"
    before = video.stat()
    write_video(video, ALERT_SHOTS, fps=FPS)
    os.utime(video, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    changed = _index(db_path, retriever, library, retrieval_toy_artifacts)
    assert (changed.videos_unchanged, changed.videos_indexed, changed.video_frames) == (0, 1, 3)
    conn = sqlite3.connect(db_path)
    stamps = sorted(t for (t,) in conn.execute("SELECT timestamp FROM frames"))
    assert stamps == [0.0, 2.0, 5.0]
    assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 1 + 3  # the old frames' embeddings dropped
    video.unlink()
    gone = _index(db_path, retriever, library, retrieval_toy_artifacts)
    assert gone.videos_removed == 1 and gone.images == 1
    assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] == 0
    conn.close()


def test_a_version_1_index_gains_the_video_tables(retriever, retrieval_toy_artifacts, library, tmp_path):
    db_path = tmp_path / "old.db"
    (library / "clips" / "scenes.mp4").unlink()
    _index(db_path, retriever, library, retrieval_toy_artifacts)
    conn = sqlite3.connect(db_path)  # as version 1 wrote it: no video tables
    conn.executescript("DROP TABLE frames; DROP TABLE videos; UPDATE meta SET value = '1' WHERE key = 'schema_version';")
    conn.close()
    write_video(library / "clips" / "scenes.mp4", SHOTS, fps=FPS)
    report = _index(db_path, retriever, library, retrieval_toy_artifacts)
    assert (report.unchanged, report.videos_indexed) == (1, 1)
    assert IndexDb.open(db_path).meta("schema_version") == "2"


def test_a_bad_video_is_listed_and_the_rest_indexed(retrieval_toy_artifacts, library, tmp_path, capsys):
    (library / "notes.mp4").write_text("not a video\n")
    (library / "empty.mkv").touch()
    status = main(["index", str(retrieval_toy_artifacts), str(library), "--db", str(tmp_path / "i.db"), "--json"])
    out = capsys.readouterr()
    assert status == 0, out.err
    report = json.loads(out.out)
    assert (report["videos"], report["videos_indexed"], report["video_frames"]) == (3, 1, len(SCENES))
    assert {(os.path.basename(u["path"]), u["reason"]) for u in report["unreadable"]} == {
        ("notes.mp4", "not a video, or a damaged or truncated one (FFmpeg: invalid data)"),
        ("empty.mkv", "empty file (0 bytes), not a video")}


def _screenshot(page, png, tmp_path):
    profile = tmp_path / f"chromium-profile-{png.stem}"
    profile.mkdir()
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1000,420",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert png.is_file(), proc.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_html_page_is_self_contained_and_shows_the_thumbnails(retriever, retrieval_toy_artifacts, library, tmp_path,
                                                                   capsys):
    _index(tmp_path / "i.db", retriever, library, retrieval_toy_artifacts)
    page = tmp_path / "results.html"
    status = main(["search", str(tmp_path / "i.db"), SCENES[1].caption, "--top", "3", "--html", str(page), "--json"])
    out = capsys.readouterr()
    assert status == 0, out.err
    results = json.loads(out.out)["results"]
    assert results[0]["timestamp"] == 2.0 and results[0]["path"].endswith("scenes.mp4")
    text = page.read_text()
    images = re.findall(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', text)
    rest = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"https?:|//|url\(|@import|<script|<link|href=", rest, re.I)  # nothing to fetch or follow
    assert re.findall(r'src="([^"]*)"', rest) == [""] * 3
    assert len(images) == 3 and "0:02.0" in text
    pixels = _screenshot(page, tmp_path / "shot.png", tmp_path)
    # Thumbnails are the only colour on the page (its text is black on white): the toy scenes'
    # saturated squares must show, and the first thumbnail's box must hold a picture, not a blank.
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 80
    assert saturated.sum() > 3 * 1500, saturated.sum()
    first = pixels[60:240, 20:200]
    assert first.std() > 20
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'<img src="[^"]+"', '<img src=""', text))
    without = _screenshot(blank, tmp_path / "b.png", tmp_path)  # the same page, its pictures taken out
    assert ((without.max(axis=2) - without.min(axis=2)) > 80).sum() < saturated.sum() / 10
