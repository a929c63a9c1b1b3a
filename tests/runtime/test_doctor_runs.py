"""The doctor's GPU comparisons, in the parts that need no GPU: the "no engine built again" check
on real files (ONNX Runtime's TensorRT provider overwrites an engine under the same name when it
rebuilds it, so the check compares what is in the files, not their names), and TF32 (off for the
comparisons; engines built with it make differing captions a skip naming the rebuild)."""

from __future__ import annotations

import os
import shutil

import pytest

from runtime.backends.tensorrt.engines import DeviceInfo, read_engine_manifest, write_engine_manifest
from runtime.doctor.environment import FAIL, PASS, SKIP, Environment
from runtime.doctor.runs import (
    TF32_OVERRIDE,
    ArtifactRun,
    cache_changes,
    cache_snapshot,
    engine_files,
    strict_fp32,
    tf32_stages,
)

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


# ---- TF32 ------------------------------------------------------------------------------------------

def test_strict_fp32_turns_tf32_off_unless_the_user_chose():
    environ = {}
    assert "TF32 off" in strict_fp32(environ) and environ == {TF32_OVERRIDE: "0"}
    environ = {TF32_OVERRIDE: "1"}
    note = strict_fp32(environ)
    assert environ == {TF32_OVERRIDE: "1"} and "may use TF32" in note


def test_engines_built_without_no_tf32_or_before_it_was_recorded_may_use_tf32(tmp_path):
    """Read back from a real engines.json, as doctor reads it."""
    flags = {"strongly_typed": True, "contexts": 2}
    write_engine_manifest(tmp_path, DeviceInfo("NVIDIA H100", "9.0", "10.3.0"), {
        "vision": {"engine": "vision.engine", "flags": {**flags, "tf32": False}},
        "qformer": {"engine": "qformer.engine", "flags": flags}})  # before build-engines recorded it
    entries = read_engine_manifest(tmp_path / "engines.json")["engines"]
    assert tf32_stages(entries) == ["qformer"]
    entries["qformer"]["flags"]["tf32"] = True
    assert tf32_stages(entries) == ["qformer"]
    entries["qformer"]["flags"]["tf32"] = False
    assert tf32_stages(entries) == []


@pytest.fixture(scope="module")
def cpu_run(toy_artifacts):
    """A real ArtifactRun whose CPU reference has run; its pipeline stands for a GPU one."""
    run = ArtifactRun(toy_artifacts, Environment(python="3", platform="Linux", onnxruntime="1",
                                                 providers=["CPUExecutionProvider"], tensorrt=None, cuda_python=None), ())
    checks = run.run()
    assert [c.status for c in checks if c.name == "cpu"] == [PASS]
    return run


def test_equal_captions_pass_and_differing_ones_fail(cpu_run):
    assert cpu_run.compare("tensorrt", cpu_run.cpu).status == PASS
    cpu_run.cpu_tokens, real = [t[::-1] for t in cpu_run.cpu_tokens], cpu_run.cpu_tokens
    try:
        check = cpu_run.compare("tensorrt", cpu_run.cpu)
        assert check.status == FAIL and check.detail.startswith("captions differ from the CPU's")
        why = "the vision engines were built with TF32: rebuild them with --no-tf32"
        check = cpu_run.compare("tensorrt", cpu_run.cpu, tf32=why)
        assert check.status == SKIP and "not comparable token for token" in check.detail and why in check.detail
        cpu_run.requested = ("tensorrt",)  # asked for by name: not proven is a failure
        assert cpu_run.compare("tensorrt", cpu_run.cpu, tf32=why).status == FAIL
    finally:
        cpu_run.cpu_tokens, cpu_run.requested = real, ()


def test_doctor_builds_its_engines_without_tf32(toy_concat_artifacts, tmp_path):
    """The real build-engines command takes doctor's arguments: here it stops at TensorRT, which
    this machine lacks, not at an unknown flag."""
    from runtime.doctor.cli import build_engines

    art = shutil.copytree(toy_concat_artifacts, tmp_path / "art")
    check = build_engines(art)
    assert check.status == FAIL and "tensorrt" in check.detail.lower(), check.detail
    assert "unrecognized arguments" not in check.detail
