"""Searching the photo index: exact top-k against a brute-force reference, chunking, the approximate
index, ITM reranking and the `search` command. Real tiny retrieval artifacts and image files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime.errors import OptionError
from runtime.index import IndexDb, PhotoSearch, ann, exact, update_index
from runtime.index.db import EMBEDDING_DTYPE
from tests.conftest import REPO, run_cli
from tests.runtime.index_photos import write_photos

TEXTS = ["a big red square on the left", "small blue", "a green striped square at the bottom of the picture"]


@pytest.fixture(scope="module")
def retriever(retrieval_tiny_artifacts):
    from runtime import Blip2Retriever

    return Blip2Retriever.from_artifacts(retrieval_tiny_artifacts)


@pytest.fixture(scope="module")
def library(retriever, retrieval_tiny_artifacts, tmp_path_factory):
    """40 photos (two pairs of identical copies) indexed once."""
    root = tmp_path_factory.mktemp("library")
    photos = write_photos(root / "photos", 38, seed=11)
    for i in (0, 1):
        (root / "photos" / f"dup{i}.png").write_bytes(photos[i].read_bytes())
    db = IndexDb.open(root / "photos.db", create=True)
    update_index(db, retriever, root / "photos", retrieval_tiny_artifacts, batch_size=8)
    yield db, root
    db.close()


def brute_force(retriever, db, text: str):
    """Every distinct content scored with numpy from the model's own float32 embeddings rounded as
    stored, sorted by (-score, id): the reference the search must equal."""
    rows = db.conn.execute("SELECT i.id, min(f.path) FROM images i JOIN files f ON f.image_id = i.id GROUP BY i.id")
    ids, paths = zip(*[(i, os.fsdecode(bytes(p))) for i, p in rows])
    emb = retriever.embed_images(list(paths)).astype(EMBEDDING_DTYPE).astype(np.float32)  # (N, Q, D)
    t = retriever.embed_texts([text])[0]
    scores = np.einsum("nqd,d->nq", emb, t).max(axis=1)
    order = sorted(range(len(ids)), key=lambda j: (-scores[j], ids[j]))
    return [ids[j] for j in order], [float(scores[j]) for j in order], [paths[j] for j in order]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("k", [1, 5, 36, 100])
def test_exact_top_k_equals_brute_force(retriever, retrieval_tiny_artifacts, library, text, k):
    db, _ = library
    ref_ids, ref_scores, _ = brute_force(retriever, db, text)
    s = PhotoSearch(db, retriever, retrieval_tiny_artifacts, mode="exact")
    hits = s.search(text, top=k)
    assert [h.image_id for h in hits] == ref_ids[:k]
    np.testing.assert_allclose([h.score for h in hits], ref_scores[:k], rtol=0, atol=1e-5)
    # the stored float16 vectors change no score by more than float16's resolution of unit vectors
    full = retriever.itc([h.path for h in hits], [text])[:, 0]
    np.testing.assert_allclose([h.score for h in hits], full, rtol=0, atol=2e-3)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10**6])
def test_chunked_search_equals_unchunked(retriever, retrieval_tiny_artifacts, library, chunk):
    db, _ = library
    whole = PhotoSearch(db, retriever, retrieval_tiny_artifacts, mode="exact", chunk=10**6)
    part = PhotoSearch(db, retriever, retrieval_tiny_artifacts, mode="exact", chunk=chunk)
    for text in TEXTS:
        a, b = whole.search(text, top=12), part.search(text, top=12)
        assert [(h.image_id, h.score) for h in a] == [(h.image_id, h.score) for h in b]


def test_top_k_merge_keeps_ties_in_id_order():
    rng = np.random.default_rng(0)
    emb = np.repeat(rng.standard_normal((1, 2, 4)), 9, axis=0).astype(np.float16)  # 9 equal images
    emb = np.concatenate([emb, rng.standard_normal((5, 2, 4)).astype(np.float16)])
    ids = rng.permutation(np.arange(100, 114))
    t = rng.standard_normal(4).astype(np.float32)
    sims = exact.similarity(emb, t[None])[:, 0]
    reference = sorted(range(14), key=lambda j: (-sims[j], ids[j]))
    for chunk in (1, 2, 5, 14):
        got, scores = exact.top_k(exact.in_chunks(ids, emb, chunk), t, 6)
        assert got.tolist() == [int(ids[j]) for j in reference[:6]]


def test_duplicates_are_one_result_with_every_path(retriever, retrieval_tiny_artifacts, library):
    db, root = library
    hits = PhotoSearch(db, retriever, retrieval_tiny_artifacts).search(TEXTS[0], top=40)
    assert len(hits) == 38  # 40 files, 38 distinct contents
    both = [h for h in hits if len(h.paths) == 2]
    assert sorted(os.path.basename(p) for h in both for p in h.paths) == ["dup0.png", "dup1.png", "img000.png",
                                                                          "img001.png"]


def test_rerank_orders_by_itm_and_rescored_set_is_the_itc_top_k(retriever, retrieval_tiny_artifacts, library):
    db, _ = library
    s = PhotoSearch(db, retriever, retrieval_tiny_artifacts, mode="exact")
    for text in TEXTS:
        itc_top = s.search(text, top=15)
        hits = s.search(text, top=5, rerank=15)
        assert len(hits) == 5 and all(h.itm is not None for h in hits)
        # the ITM head's own probabilities for every candidate, through the public API
        probs = retriever.itm([h.path for h in itc_top], [text])[:, 0]
        expected = sorted(range(15), key=lambda j: (-probs[j], -itc_top[j].score, itc_top[j].image_id))[:5]
        assert [h.image_id for h in hits] == [itc_top[j].image_id for j in expected]
        np.testing.assert_allclose([h.itm for h in hits], [probs[j] for j in expected], rtol=0, atol=1e-6)
    with pytest.raises(OptionError, match="--rerank"):
        s.search(TEXTS[0], top=10, rerank=5)


def test_rerank_skips_a_file_changed_since_indexing(retriever, retrieval_tiny_artifacts, tmp_path):
    photos = write_photos(tmp_path / "photos", 4, seed=3)
    db = IndexDb.open(tmp_path / "p.db", create=True)
    update_index(db, retriever, tmp_path / "photos", retrieval_tiny_artifacts)
    s = PhotoSearch(db, retriever, retrieval_tiny_artifacts, mode="exact")
    best = s.search(TEXTS[0], top=1)[0]
    os.utime(best.path, ns=(1, 1))
    with pytest.warns(UserWarning, match="changed or gone since it was indexed"):
        hits = s.search(TEXTS[0], top=4, rerank=4)
    assert hits[-1].image_id == best.image_id and hits[-1].itm is None
    assert all(h.itm is not None for h in hits[:-1]) and len(photos) == 4
    db.close()


def test_approximate_index_is_built_used_and_dropped_when_stale(retriever, retrieval_tiny_artifacts, tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 30, seed=4)
    db = IndexDb.open(tmp_path / "p.db", create=True)
    r = update_index(db, retriever, photos, retrieval_tiny_artifacts, ann_threshold=10)
    assert r.ann == "built"
    assert update_index(db, retriever, photos, retrieval_tiny_artifacts, ann_threshold=10).ann == "current"
    exact_s = PhotoSearch(db, retriever, retrieval_tiny_artifacts, mode="exact")
    approx = PhotoSearch(db, retriever, retrieval_tiny_artifacts, candidates=30)
    assert approx.mode == "approximate"
    for text in TEXTS:  # every image a candidate: the exact re-scoring gives the exact answer
        assert [(h.image_id, h.score) for h in approx.search(text, top=10)] == \
               [(h.image_id, h.score) for h in exact_s.search(text, top=10)]
    # new vectors committed without a rebuild (an indexing run killed before its end): not used
    write_photos(photos / "more", 2, seed=9)
    update_index(db, retriever, photos, retrieval_tiny_artifacts, ann_threshold=10**9)
    assert PhotoSearch(db, retriever, retrieval_tiny_artifacts).mode == "exact"
    with pytest.raises(Exception, match="no current approximate index"):
        PhotoSearch(db, retriever, retrieval_tiny_artifacts, mode="approximate")
    assert db.conn.execute("SELECT count(*) FROM ann").fetchone()[0] == 0
    assert ann.rebuild_if_needed(db, db.model(), threshold=10) == "built"
    db.close()


def test_a_graph_this_user_did_not_seal_is_never_restored(retriever, retrieval_tiny_artifacts, tmp_path,
                                                          monkeypatch):
    """usearch cannot validate a graph blob (a crafted one can crash the process): a tampered
    graph, or one from another user's key, is ignored (exact search) until the next index run."""
    photos = tmp_path / "photos"
    write_photos(photos, 12, seed=4)
    db = IndexDb.open(tmp_path / "p.db", create=True)
    assert update_index(db, retriever, photos, retrieval_tiny_artifacts, ann_threshold=10).ann == "built"
    assert PhotoSearch(db, retriever, retrieval_tiny_artifacts).mode == "approximate"
    blob = bytearray(db.conn.execute("SELECT data FROM ann").fetchone()[0])
    blob[len(blob) // 2] ^= 0xFF  # what a crafted or damaged file holds
    with db.transaction() as c:
        c.execute("UPDATE ann SET data = ?", (bytes(blob),))
    search = PhotoSearch(db, retriever, retrieval_tiny_artifacts)
    assert search.mode == "exact" and len(search.search(TEXTS[0], top=3)) == 3
    assert update_index(db, retriever, photos, retrieval_tiny_artifacts, ann_threshold=10).ann == "built"
    assert PhotoSearch(db, retriever, retrieval_tiny_artifacts).mode == "approximate"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-user"))  # the same db, another key
    assert PhotoSearch(db, retriever, retrieval_tiny_artifacts).mode == "exact"
    (tmp_path / "no-key" / "blip2-edge" / "index-graph.key").mkdir(parents=True)  # no usable key at all
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-key"))
    assert PhotoSearch(db, retriever, retrieval_tiny_artifacts).mode == "exact"
    write_photos(photos / "more", 1, seed=9)
    assert update_index(db, retriever, photos, retrieval_tiny_artifacts, ann_threshold=10).ann.startswith("none")
    db.close()


@pytest.mark.parametrize("column", ["data", "kind"])
def test_a_damaged_graph_row_leaves_search_exact(retriever, retrieval_tiny_artifacts, tmp_path, column):
    """Text that is not UTF-8 where the graph's blob (or its kind) should be: SQLite cannot decode
    it as text, and search must stay exact instead of failing; the next index run rebuilds it."""
    photos = tmp_path / "photos"
    write_photos(photos, 12, seed=5)
    db = IndexDb.open(tmp_path / "p.db", create=True)
    assert update_index(db, retriever, photos, retrieval_tiny_artifacts, ann_threshold=10).ann == "built"
    with db.transaction() as c:
        c.execute(f"UPDATE ann SET {column} = CAST(x'c3287f' AS TEXT)")  # an invalid UTF-8 sequence
    search = PhotoSearch(db, retriever, retrieval_tiny_artifacts)
    assert search.mode == "exact" and len(search.search(TEXTS[0], top=3)) == 3
    assert update_index(db, retriever, photos, retrieval_tiny_artifacts, ann_threshold=10).ann == "built"
    assert PhotoSearch(db, retriever, retrieval_tiny_artifacts).mode == "approximate"
    db.close()


def test_undecodable_search_text_is_one_line(library, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "search", str(library[1] / "photos.db"),
                           b"red \xff\xfe square"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: TEXT: not valid text"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_index_and_search_commands(retriever, retrieval_tiny_artifacts, tmp_path):
    art = shutil.copytree(retrieval_tiny_artifacts, tmp_path / "model")  # moved away below
    photos = tmp_path / "photos"
    write_photos(photos, 12, seed=6)
    (photos / "notes.jpg").write_text("hello")
    db = tmp_path / "photos.db"
    proc = run_cli("index", art, photos, "--db", db, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["embedded"] == 12 and [u["path"] for u in report["unreadable"]] == [str(photos / "notes.jpg")]
    assert proc.stderr == ""  # no progress bar off a terminal unless asked

    proc = run_cli("index", art, photos, "--db", db, "--progress")
    assert proc.returncode == 0 and "unchanged" in proc.stdout and "1 unreadable" in proc.stdout
    assert "indexing" in proc.stderr and "1/1" in proc.stderr  # the unreadable file is tried again each run

    proc = run_cli("search", db, TEXTS[0], "--top", "3", "--rerank", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    s = PhotoSearch(IndexDb.open(db), retriever, retrieval_tiny_artifacts)
    expected = s.search(TEXTS[0], top=3, rerank=6)
    assert [r["path"] for r in out["results"]] == [h.path for h in expected]
    assert [r["itm"] for r in out["results"]] == pytest.approx([h.itm for h in expected], abs=1e-5)
    assert out["mode"] == "exact" and out["reranked"] is True

    proc = run_cli("search", db, TEXTS[1], "--top", "2")  # plain text: rank, score, path
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2 and lines[0].lstrip().startswith("1.")

    moved = art.rename(tmp_path / "moved-model")
    proc = run_cli("search", db, TEXTS[1])
    assert proc.returncode == 2 and "--model" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_cli("search", db, TEXTS[1], "--model", moved, "--top", "2")
    assert proc.returncode == 0, proc.stderr


def test_toy_library_finds_each_scene_by_its_caption(retrieval_toy_artifacts, tmp_path):
    """The trained toy retrieval model through the whole index: a held-out gallery with one image
    per distinct caption; searching each caption must rank its own image first (>= 90%), before
    and after ITM reranking."""
    from exporter.toy.train import RENDER_SIZE
    from exporter.toy.train_retrieval import all_scenes
    from runtime import Blip2Retriever, synthetic

    rng = np.random.default_rng(2024)
    photos = tmp_path / "photos"
    photos.mkdir()
    scenes = all_scenes()
    for i, scene in enumerate(scenes):
        synthetic.render(scene, rng, RENDER_SIZE).save(photos / f"scene{i:03d}.png")
    toy = Blip2Retriever.from_artifacts(retrieval_toy_artifacts)
    db = IndexDb.open(tmp_path / "photos.db", create=True)
    assert update_index(db, toy, photos, retrieval_toy_artifacts).embedded == len(scenes)
    s = PhotoSearch(db, toy, retrieval_toy_artifacts)
    own = [os.path.basename(s.search(scene.caption, top=1)[0].path) == f"scene{i:03d}.png"
           for i, scene in enumerate(scenes)]
    assert np.mean(own) >= 0.90, np.mean(own)
    some = range(0, len(scenes), 4)
    reranked = [os.path.basename(s.search(scenes[i].caption, top=1, rerank=5)[0].path) == f"scene{i:03d}.png"
                for i in some]
    assert np.mean(reranked) >= 0.90, np.mean(reranked)
    print(f"toy top-1: {np.mean(own):.3f} exact, {np.mean(reranked):.3f} reranked")
    db.close()
