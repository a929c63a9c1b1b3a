"""The doctor's "no engine built again" check on real files: ONNX Runtime's TensorRT provider
overwrites an engine under the same name when it rebuilds it, so the check compares what is in
the files, not their names."""

from __future__ import annotations

import os

from runtime.doctor.runs import cache_changes, cache_snapshot, engine_files

ENGINE = "TensorrtExecutionProvider_TRTKernel_graph_main_graph_1234567890_0_0_sm87.engine"
PROFILE = ENGINE.replace(".engine", ".profile")
TIMING = "TensorrtExecutionProvider_cache_sm87.timing"


def _cache(tmp_path):
    cache = tmp_path / "engines" / "ort1.20.1-trt10.3.0-sm87"
    cache.mkdir(parents=True)
    for name, data in ((ENGINE, b"engine-v1" * 100), (PROFILE, b"profile-v1"), (TIMING, b"timing-v1")):
        (cache / name).write_bytes(data)
    return cache


def test_an_untouched_cache_shows_no_change(tmp_path):
    cache = _cache(tmp_path)
    before = cache_snapshot(cache)
    assert sorted(before) == sorted([ENGINE, PROFILE, TIMING]) and engine_files(before) == [ENGINE]
    (cache / ENGINE).read_bytes()  # reading is not writing
    assert cache_changes(before, cache_snapshot(cache)) == []


def test_an_engine_rewritten_under_the_same_name_is_seen_even_with_its_old_size_and_mtime(tmp_path):
    cache = _cache(tmp_path)
    before = cache_snapshot(cache)
    old = (cache / ENGINE).stat()
    (cache / ENGINE).write_bytes(b"engine-v2" * 100)  # what ORT does: same name, same inode, same size
    os.utime(cache / ENGINE, ns=(old.st_atime_ns, old.st_mtime_ns))  # a clock too coarse to tell
    after = cache_snapshot(cache)
    assert sorted(after) == sorted(before)  # the names alone say nothing happened
    assert cache_changes(before, after) == [f"rewritten {ENGINE}"]


def test_the_same_bytes_written_again_are_seen_by_their_mtime(tmp_path):
    cache = _cache(tmp_path)
    before = cache_snapshot(cache)
    old = (cache / PROFILE).stat()
    (cache / PROFILE).write_bytes(b"profile-v1")  # a deterministic rebuild: identical content
    os.utime(cache / PROFILE, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000))
    assert cache_changes(before, cache_snapshot(cache)) == [f"rewritten {PROFILE}"]


def test_a_file_replaced_by_rename_is_seen(tmp_path):
    cache = _cache(tmp_path)
    before = cache_snapshot(cache)
    old = (cache / TIMING).stat()
    tmp = cache / "timing.tmp"
    tmp.write_bytes(b"timing-v1")
    keep = cache / "keep"  # holds the old inode, so the new file cannot reuse its number
    os.link(cache / TIMING, keep)
    os.replace(tmp, cache / TIMING)
    os.utime(cache / TIMING, ns=(old.st_atime_ns, old.st_mtime_ns))
    keep.unlink()
    assert cache_changes(before, cache_snapshot(cache)) == [f"rewritten {TIMING}"]


def test_new_and_removed_files_are_seen(tmp_path):
    cache = _cache(tmp_path)
    before = cache_snapshot(cache)
    second = ENGINE.replace("_0_0_", "_1_1_")
    (cache / second).write_bytes(b"another engine")
    (cache / PROFILE).unlink()
    assert cache_changes(before, cache_snapshot(cache)) == [f"new {second}", f"removed {PROFILE}"]


def test_a_missing_cache_directory_is_empty_and_links_are_not_followed(tmp_path):
    assert cache_snapshot(tmp_path / "nothing") == {}
    cache = _cache(tmp_path)
    (cache / "link.engine").symlink_to(tmp_path)  # not a file ONNX Runtime wrote
    assert "link.engine" not in cache_snapshot(cache)
