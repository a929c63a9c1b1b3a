"""The photo index (runtime/index/): incremental updates, unreadable files, the model record, damaged
and foreign db files, and an indexing run killed with SIGKILL. Real tiny retrieval artifacts, real
image files, real SQLite."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime.index import IndexDb, IndexDbError, update_index
from runtime.index.db import EMBEDDING_DTYPE
from tests.conftest import REPO, run_cli
from tests.runtime.index_photos import indexed_paths, stored, write_photos, write_unreadable


@pytest.fixture(scope="module")
def retriever(retrieval_tiny_artifacts):
    from runtime import Blip2Retriever

    return Blip2Retriever.from_artifacts(retrieval_tiny_artifacts)


def _index(db, retriever, photos, art, **kw):
    return update_index(db, retriever, photos, art, batch_size=kw.pop("batch_size", 3), **kw)


def _expected(retriever, path) -> np.ndarray:
    return retriever.embed_images([str(path)])[0].astype(EMBEDDING_DTYPE)


def test_incremental_update_embeds_only_new_or_changed_content(retriever, retrieval_tiny_artifacts, tmp_path):
    art, photos = retrieval_tiny_artifacts, tmp_path / "photos"
    paths = write_photos(photos, 6)
    bad = write_unreadable(photos)
    db = IndexDb.open(tmp_path / "photos.db", create=True)

    r = _index(db, retriever, photos, art)
    assert (r.embedded, r.unchanged, r.relinked, r.removed, r.images) == (6, 0, 0, 0, 6)
    assert sorted(p for p, _ in r.unreadable) == sorted(str(p) for p in bad)
    assert all(reason for _, reason in r.unreadable)
    for p in paths:
        np.testing.assert_array_equal(stored(db, p), _expected(retriever, p))

    r = _index(db, retriever, photos, art)  # nothing changed: nothing embedded, nothing rewritten
    assert (r.embedded, r.unchanged, r.relinked, r.removed) == (0, 6, 0, 0)

    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: hashed again, same content
    replaced = paths[1]
    write_photos(tmp_path / "other", 1, seed=99)[0].replace(replaced)  # new content under an old name
    paths[2].unlink()  # deleted
    added = write_photos(tmp_path / "new", 1, seed=77)[0]
    added = added.replace(photos / "added.png")
    (photos / "sub").mkdir()
    moved = paths[3].rename(photos / "sub" / "moved.png")
    copy = photos / "copy.png"
    shutil.copyfile(paths[4], copy)

    generation = db.generation()
    r = _index(db, retriever, photos, art)
    # embedded: the replaced content and the added file; relinked: touched, moved, copy
    assert (r.embedded, r.relinked, r.unchanged) == (2, 3, 2)
    assert r.removed == 2  # the deleted file and the moved file's old name
    assert r.images == 6  # 6 - replaced - deleted + replacement + added (the copy shares its content)
    assert db.generation() > generation
    assert indexed_paths(db) == {str(p) for p in (paths[0], replaced, added, moved, paths[4], copy, paths[5])}
    for p in (paths[0], replaced, added, moved, copy):
        np.testing.assert_array_equal(stored(db, p), _expected(retriever, p))
    shas = db.conn.execute("SELECT count(*) FROM images WHERE id NOT IN (SELECT image_id FROM files)").fetchone()
    assert shas[0] == 0  # the replaced and deleted contents' embeddings are gone

    bad[0].unlink()
    r = _index(db, retriever, photos, art)
    assert (r.embedded, r.relinked, r.removed, len(r.unreadable)) == (0, 0, 0, 2)
    db.close()


def test_a_file_that_becomes_unreadable_loses_its_old_embedding(retriever, retrieval_tiny_artifacts, tmp_path):
    photos = tmp_path / "photos"
    paths = write_photos(photos, 2)
    db = IndexDb.open(tmp_path / "p.db", create=True)
    _index(db, retriever, photos, retrieval_tiny_artifacts)
    paths[0].write_bytes(b"garbage now")
    r = _index(db, retriever, photos, retrieval_tiny_artifacts)
    assert [p for p, _ in r.unreadable] == [str(paths[0])]
    assert (r.removed, r.images) == (1, 1)
    assert indexed_paths(db) == {str(paths[1])}
    db.close()


def test_a_db_made_by_another_artifact_is_refused(retriever, retrieval_tiny_artifacts, retrieval_tiny_other_artifacts,
                                                   tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 2)
    db = tmp_path / "photos.db"
    assert run_cli("index", retrieval_tiny_artifacts, photos, "--db", db).returncode == 0
    before = sqlite3.connect(db).execute("SELECT sha256, embedding FROM images ORDER BY id").fetchall()
    write_photos(photos / "more", 1, seed=8)
    for args in (("index", retrieval_tiny_other_artifacts, photos, "--db", db),
                 ("search", db, "a red square", "--model", retrieval_tiny_other_artifacts)):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
        assert "model" in lines[0] and ("new --db" in lines[0] or "search with that model" in lines[0])
    assert sqlite3.connect(db).execute("SELECT sha256, embedding FROM images ORDER BY id").fetchall() == before


@pytest.mark.parametrize("damage", ["random bytes", "header overwritten", "truncated", "foreign sqlite",
                                    "newer schema", "directory", "model record", "embedding size", "generation"])
def test_a_damaged_or_foreign_db_is_one_line_exit_2(retrieval_tiny_artifacts, tmp_path, damage):
    photos = tmp_path / "photos"
    write_photos(photos, 4)
    db = tmp_path / "photos.db"
    assert run_cli("index", retrieval_tiny_artifacts, photos, "--db", db).returncode == 0
    data = db.read_bytes()
    if damage == "random bytes":
        db.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    elif damage == "header overwritten":
        db.write_bytes(b"\0" * 100 + data[100:])
    elif damage == "truncated":
        db.write_bytes(data[: len(data) // 3])
    elif damage == "foreign sqlite":
        db.unlink()
        sqlite3.connect(db).execute("CREATE TABLE notes (x)")
    elif damage == "newer schema":
        c = sqlite3.connect(db)
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        c.commit()
        c.close()
    elif damage in ("model record", "embedding size", "generation"):
        c = sqlite3.connect(db)
        if damage == "generation":
            c.execute("UPDATE meta SET value = 'x1' WHERE key = 'generation'")
        elif damage == "model record":
            c.execute("UPDATE meta SET value = '0' WHERE key = 'num_query_tokens'")
        else:
            c.execute("UPDATE images SET embedding = x'00' WHERE id = (SELECT min(id) FROM images)")
        c.commit()
        c.close()
    elif damage == "directory":
        db.unlink()
        db.mkdir()
    commands = [("search", db, "a red square"), ("index", retrieval_tiny_artifacts, photos, "--db", db)]
    if damage == "embedding size":  # an index run reads no stored vector (below the --ann-threshold)
        commands.pop()
    if damage == "generation":  # only an index run (or an approximate search) reads it
        commands.pop(0)
    for args in commands:
        proc = run_cli(*args)
        assert proc.returncode == 2, (damage, args[0], proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(db) in lines[0], (damage, proc.stderr)
    if damage == "newer schema":
        assert "upgrade blip2-edge" in lines[0]


def test_missing_db_for_search_is_one_line(tmp_path):
    proc = run_cli("search", tmp_path / "none.db", "a dog")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "blip2-edge index" in proc.stderr
    assert not (tmp_path / "none.db").exists()


def test_killed_indexing_run_keeps_every_commit_and_resumes(retrieval_tiny_artifacts, retriever, tmp_path):
    """SIGKILL in the middle of a real `blip2-edge index` run: what was committed stays, the file
    passes integrity_check, and the next run embeds exactly what is missing."""
    photos = tmp_path / "photos"
    n = 120
    write_photos(photos, n, size=640, fmt="jpg")  # large enough that decoding paces the run
    db = tmp_path / "photos.db"
    cmd = [sys.executable, "-m", "runtime.cli", "index", str(retrieval_tiny_artifacts), str(photos), "--db", str(db),
           "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
                    if c.execute("SELECT count(*) FROM images").fetchone()[0] >= 3:
                        break
            except sqlite3.Error:
                pass  # not made yet
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    c = sqlite3.connect(db)
    assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    committed = dict(c.execute("SELECT sha256, embedding FROM images").fetchall())
    files = c.execute("SELECT count(*) FROM files").fetchone()[0]
    c.close()
    assert 3 <= len(committed) < n, "killed mid-run: some but not all images committed"

    proc = run_cli("index", retrieval_tiny_artifacts, photos, "--db", db, "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["unchanged"] == files and report["embedded"] == n - len(committed) and report["images"] == n
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    after = dict(c.execute("SELECT sha256, embedding FROM images").fetchall())
    assert all(after[sha] == blob for sha, blob in committed.items())  # nothing committed was lost or rewritten
    some = sorted(photos.iterdir())[:: n // 6]
    d = IndexDb.open(db)
    for p in some:
        np.testing.assert_array_equal(stored(d, p), _expected(retriever, p))
    d.close()


def test_open_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "photos.db"
    os.mkfifo(fifo)
    with pytest.raises(IndexDbError, match="not a regular file"):
        IndexDb.open(fifo, create=True)


def test_the_index_modules_load_no_torch_and_no_ann_library_until_needed():
    code = ("import sys, runtime.index, runtime.index.cli, runtime.index.ann\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'onnx', 'exporter', 'calibration', 'usearch')]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_images_over_the_pixel_limit_are_listed_not_decoded(retriever, retrieval_tiny_artifacts, tmp_path):
    photos = tmp_path / "photos"
    small = write_photos(photos, 2, size=8)
    big = write_photos(photos / "big", 1, size=300)[0]
    db = IndexDb.open(tmp_path / "p.db", create=True)
    r = _index(db, retriever, photos, retrieval_tiny_artifacts, max_pixels=100)
    assert r.embedded == 2 and [p for p, _ in r.unreadable] == [str(big)]
    assert "over the limit" in r.unreadable[0][1]
    assert indexed_paths(db) == {str(p) for p in small}
    db.close()


def test_a_file_written_to_while_it_is_indexed_is_not_recorded(retriever, retrieval_tiny_artifacts, tmp_path,
                                                                monkeypatch):
    """The hash and the pixels must be of one version of the file: one rewritten between the two
    (here: while it is decoded) is left for the next run."""
    from runtime.preprocess import Preprocessing

    photos = tmp_path / "photos"
    paths = write_photos(photos, 3)
    real_load = Preprocessing.load

    def load_while_rewritten(self, path, max_pixels):
        image = real_load(self, path, max_pixels)
        if str(path) == str(paths[1]):
            write_photos(tmp_path / "other", 1, seed=50)[0].replace(paths[1])
        return image

    monkeypatch.setattr(Preprocessing, "load", load_while_rewritten)
    db = IndexDb.open(tmp_path / "p.db", create=True)
    r = _index(db, retriever, photos, retrieval_tiny_artifacts)
    assert r.embedded == 2 and [p for p, _ in r.unreadable] == [str(paths[1])]
    assert "changed while being indexed" in r.unreadable[0][1]
    monkeypatch.setattr(Preprocessing, "load", real_load)
    r = _index(db, retriever, photos, retrieval_tiny_artifacts)
    assert (r.embedded, r.unchanged, r.unreadable) == (1, 2, [])
    np.testing.assert_array_equal(stored(db, paths[1]), _expected(retriever, paths[1]))
    db.close()


def _as_a_user_who_cannot_read() -> list[str]:
    """The command prefix that runs `index` without root's power to read any folder: root's
    file-permission capabilities dropped (setpriv), or nothing for a user who is not root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: a folder without read permission is readable all the same")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


def _index_cli(prefix, art, photos, db, *extra):
    return subprocess.run([*prefix, sys.executable, "-m", "runtime.cli", "index", str(art), str(photos), "--db", str(db),
                           *extra], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_an_unreadable_folder_keeps_its_records_and_is_reported(retrieval_tiny_artifacts, tmp_path):
    """The probe's case: a sub-folder that cannot be listed used to read as 'deleted' (rglob
    skips it without a word) and emptied its part of the index."""
    photos, db = tmp_path / "photos", tmp_path / "p.db"
    write_photos(photos, 3)
    write_photos(photos / "sub", 5, seed=8)
    prefix = _as_a_user_who_cannot_read()
    assert _index_cli(prefix, retrieval_tiny_artifacts, photos, db).returncode == 0
    os.chmod(photos / "sub", 0)
    try:
        proc = _index_cli(prefix, retrieval_tiny_artifacts, photos, db)
    finally:
        os.chmod(photos / "sub", 0o755)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (f"warning: {photos / 'sub'}: folder cannot be read (Permission denied); what the index "
                           "holds from it is kept\n")
    assert "0 removed" in proc.stdout and "5 kept from folders that could not be read" in proc.stdout
    conn = IndexDb.open(db)
    assert len(indexed_paths(conn)) == 8
    conn.close()


def test_an_unreadable_photo_folder_changes_nothing(retrieval_tiny_artifacts, tmp_path):
    photos, db = tmp_path / "photos", tmp_path / "p.db"
    write_photos(photos, 3)
    prefix = _as_a_user_who_cannot_read()
    assert _index_cli(prefix, retrieval_tiny_artifacts, photos, db).returncode == 0
    os.chmod(photos, 0o311)  # can be entered, not listed
    try:
        proc = _index_cli(prefix, retrieval_tiny_artifacts, photos, db)
    finally:
        os.chmod(photos, 0o755)
    assert proc.returncode == 2 and proc.stderr == f"error: {photos}: cannot be read (Permission denied); nothing was changed\n"


def test_a_folder_that_lists_no_image_any_more_is_not_emptied_silently(retriever, retrieval_tiny_artifacts, tmp_path):
    """A drive that is not mounted leaves an empty mount point: every record would read as
    deleted. That is refused unless asked for (--allow-empty)."""
    photos, db_path = tmp_path / "photos", tmp_path / "p.db"
    paths = write_photos(photos, 3)
    db = IndexDb.open(db_path, create=True)
    _index(db, retriever, photos, retrieval_tiny_artifacts)
    for p in paths:
        p.unlink()
    with pytest.raises(Exception, match="no images there, but the index holds 3 from it .* --allow-empty"):
        _index(db, retriever, photos, retrieval_tiny_artifacts)
    assert len(indexed_paths(db)) == 3
    assert _index(db, retriever, photos, retrieval_tiny_artifacts, allow_empty=True).removed == 3
    assert indexed_paths(db) == set()
    db.close()
    proc = run_cli("index", retrieval_tiny_artifacts, photos, "--db", db_path)
    assert proc.returncode == 0  # nothing indexed from it any more: an empty folder is just empty
