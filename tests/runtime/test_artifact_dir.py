"""Writing artifact directories never loses the user's data: OUT_DIR is checked again at the rename,
only our own artifact directories are replaced, one writer at a time, the old output survives a
failed swap, and leftovers of a kill -9 are cleaned by the next write. Real processes and kills,
each bounded in time."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.artifact import writer as artifact_dir
from runtime.artifact.writer import atomic_directory, is_artifact_dir
from runtime.errors import ArtifactError, Blip2EdgeError
from tests.conftest import REPO, run_cli
from tests.exporter.test_export_errors import assert_one_line_error

MANIFEST = {"format": "blip2-edge-artifacts", "schema_version": 1}


def make_artifact_dir(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(MANIFEST))
    (path / "marker.txt").write_text(marker)
    return path


def write(out: Path, marker: str, overwrite: bool = False, during=None) -> None:
    """One atomic write of a (fake) artifact directory; `during(tmp)` runs before the commit."""
    with atomic_directory(out, overwrite) as tmp:
        (tmp / "marker.txt").write_text(marker)
        if during:
            during(tmp)
        (tmp / "manifest.json").write_text(json.dumps(MANIFEST))


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


@pytest.fixture(params=["renameat2", "rename"])
def rename_kind(request, monkeypatch):
    """Both code paths: renameat2 (NOREPLACE / EXCHANGE) and the plain-rename fallback."""
    if request.param == "renameat2":
        if artifact_dir._renameat2 is None:
            pytest.skip("no renameat2 in this libc")
    else:
        monkeypatch.setattr(artifact_dir, "_renameat2", None)
    return request.param


def test_write_and_overwrite_leave_only_out(tmp_path, rename_kind):
    out = tmp_path / "out"
    write(out, "one")
    assert (out / "marker.txt").read_text() == "one" and siblings(out) == ["out"]
    write(out, "two", overwrite=True)
    assert (out / "marker.txt").read_text() == "two" and siblings(out) == ["out"]


def test_failure_leaves_out_as_it_was(tmp_path):
    out = make_artifact_dir(tmp_path / "out", "old")

    def boom(tmp):
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        write(out, "new", overwrite=True, during=boom)
    assert (out / "marker.txt").read_text() == "old" and siblings(out) == ["out"]


@pytest.mark.parametrize("kind", ["thesis-dir", "file", "link-to-artifacts", "empty-dir"])
def test_overwrite_refuses_what_is_not_ours(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "thesis-dir":
        out.mkdir()
        (out / "thesis.tex").write_text("\\chapter{Results}")
    elif kind == "file":
        out.write_text("notes")
    elif kind == "empty-dir":
        out.mkdir()
    else:
        out.symlink_to(make_artifact_dir(tmp_path / "real", "linked"))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(Blip2EdgeError, match="not a blip2-edge artifact directory.*even with --overwrite"):
        write(out, "new", overwrite=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("intruder", ["empty-dir", "full-dir", "file"])
def test_out_created_during_the_run_is_refused_and_kept(tmp_path, rename_kind, intruder):
    out = tmp_path / "out"

    def someone_else(tmp):
        if intruder == "file":
            out.write_text("theirs")
        else:
            out.mkdir()
            if intruder == "full-dir":
                (out / "thesis.tex").write_text("theirs")

    with pytest.raises(Blip2EdgeError, match="created or replaced by someone else while this run was writing"):
        write(out, "ours", during=someone_else)
    assert os.path.lexists(out) and siblings(out) == ["out"]
    if intruder == "file":
        assert out.read_text() == "theirs"
    else:
        assert [p.name for p in out.iterdir()] == (["thesis.tex"] if intruder == "full-dir" else [])


def test_artifacts_replaced_by_a_user_directory_during_the_run_are_kept(tmp_path, rename_kind):
    out = make_artifact_dir(tmp_path / "out", "old")

    def swap_in_user_dir(tmp):
        shutil.rmtree(out)
        out.mkdir()
        (out / "thesis.tex").write_text("theirs")

    with pytest.raises(Blip2EdgeError, match="by someone else while this run was writing"):
        write(out, "new", overwrite=True, during=swap_in_user_dir)
    assert (out / "thesis.tex").read_text() == "theirs" and siblings(out) == ["out"]


def test_the_swap_can_never_remove_a_user_directory(tmp_path, rename_kind, monkeypatch):
    """The race no check can close: OUT_DIR replaced right after its last check, before the
    rename. What was swapped out is checked once more and put back."""
    out = make_artifact_dir(tmp_path / "out", "old")
    real = artifact_dir.is_artifact_dir
    armed = []

    def check_then_race(path):
        ok = real(path)
        if armed and Path(path) == out:
            armed.clear()
            shutil.rmtree(out)
            out.mkdir()
            (out / "thesis.tex").write_text("theirs")
        return ok

    monkeypatch.setattr(artifact_dir, "is_artifact_dir", check_then_race)
    with pytest.raises(Blip2EdgeError, match="replaced by something else while this run was writing"):
        write(out, "new", overwrite=True, during=lambda tmp: armed.append(True))
    assert (out / "thesis.tex").read_text() == "theirs" and siblings(out) == ["out"]


def test_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_dir, "_renameat2", None)  # the two-rename path
    out = make_artifact_dir(tmp_path / "out", "old")
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in str(src):
            raise OSError(28, "No space left on device")  # the second rename: new -> out
        real_rename(src, dst)

    monkeypatch.setattr(artifact_dir.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        write(out, "new", overwrite=True)
    assert (out / "marker.txt").read_text() == "old" and siblings(out) == ["out"]


def test_failing_to_remove_the_old_copy_is_a_warning_not_a_failure(tmp_path, rename_kind, monkeypatch, caplog):
    out = make_artifact_dir(tmp_path / "out", "old")
    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False, **kw):
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, ignore_errors=ignore_errors, **kw)

    monkeypatch.setattr(artifact_dir.shutil, "rmtree", rmtree)
    with caplog.at_level(logging.WARNING, logger="runtime.artifact.writer"):
        write(out, "new", overwrite=True)  # does not raise
    assert (out / "marker.txt").read_text() == "new"
    assert "previous version could not be removed" in caplog.text


# ---- real processes: the lock, kill -9 and stale leftovers -----------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from runtime.artifact.writer import atomic_directory
from runtime.errors import Blip2EdgeError
out, ready, release = map(Path, sys.argv[1:4])
try:
    with atomic_directory(out, False) as tmp:
        (tmp / "marker.txt").write_text("holder")
        ready.touch()
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (tmp / "manifest.json").write_text('{"format": "blip2-edge-artifacts"}')
except Blip2EdgeError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def start_holder(tmp_path: Path, out: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    ready, release = tmp_path / f"{name}.ready", tmp_path / f"{name}.release"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ready), str(release)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready, release


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_two_processes_cannot_both_write_one_out_dir(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    first, ready, release = start_holder(tmp_path, out, "first")
    try:
        wait_for(ready.exists, first)
        second, _, _ = start_holder(tmp_path, out, "second")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert "another blip2-edge process is writing this OUT_DIR" in err and str(out) in err
        release.touch()
        first.communicate(timeout=60)
        assert first.returncode == 0
    finally:
        first.kill()
    assert (out / "marker.txt").read_text() == "holder"
    assert siblings(out) == ["out"]  # lock file and partial gone
    third, _, release3 = start_holder(tmp_path, out, "third")
    release3.touch()
    _, err = third.communicate(timeout=60)
    assert third.returncode == 2 and "already exists" in err


def test_kill_9_leftovers_are_cleaned_by_the_next_write(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    proc, ready, _ = start_holder(tmp_path, out, "killed")
    wait_for(ready.exists, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    partial = work / f".out.partial-{proc.pid}"
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    write(out, "next")
    assert (out / "marker.txt").read_text() == "next"
    assert siblings(out) == ["out"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_stranded_old_output_is_restored_not_removed(tmp_path):
    """kill -9 between the two renames of the fallback swap: the old output is put back."""
    out = tmp_path / "out"
    stranded = make_artifact_dir(tmp_path / f".out.old-{dead_pid()}", "previous")
    (tmp_path / f".out.partial-{dead_pid()}").mkdir()
    with pytest.raises(Blip2EdgeError, match="already exists"):
        write(out, "new")
    assert (out / "marker.txt").read_text() == "previous" and not stranded.exists()
    assert siblings(out) == ["out"]


def test_leftovers_of_a_live_process_are_kept(tmp_path):
    live = tmp_path / f".out.partial-{os.getppid()}"
    live.mkdir()
    write(tmp_path / "out", "new")
    assert live.is_dir()


# ---- through the real commands ---------------------------------------------------------------

def test_kill_9_during_a_real_export(tmp_path, tiny_checkpoint):
    """Killed once every file but the manifest is written (it validates then): the leftover is
    not loadable, and the next export to the same OUT_DIR succeeds and removes it."""
    from exporter.export import ExportOptions, export
    from runtime.artifact.manifest import load_manifest
    from runtime.pipeline import Blip2Pipeline

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "export", str(tiny_checkpoint), str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / f".out.partial-{proc.pid}"
    try:
        wait_for(lambda: (partial / "generation_config.json").exists(), proc, timeout=300)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert partial.is_dir() and (partial / "decoder.onnx").is_file()
    assert not (partial / "manifest.json").exists()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        Blip2Pipeline.from_artifacts(partial)
    export(str(tiny_checkpoint), out, ExportOptions(validate=False), log=lambda s: None)
    load_manifest(out)
    assert siblings(out) == ["out"]


def test_three_concurrent_quantizes_to_one_out_dir_one_wins(tmp_path, toy_artifacts):
    """The issue's reproduction: all three exited 0. Now one writes OUT_DIR; the others are
    refused (by the lock while it runs, or because OUT_DIR exists once it is done)."""
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "runtime.cli", "quantize", str(toy_artifacts), str(out), "--synthetic", "8",
           "--held-out", "8", "--no-gate"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        results = [(p.communicate(timeout=600)[1], p.returncode)[::-1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert sorted(code for code, _ in results) == [0, 2, 2], results
    for code, err in results:
        if code == 2:
            assert "another blip2-edge process is writing this OUT_DIR" in err or "already exists" in err, err
    from runtime.artifact.manifest import load_manifest

    load_manifest(out)
    assert siblings(out) == ["q"]


def test_overwrite_never_replaces_a_user_directory_export(tmp_path):
    project = tmp_path / "my_project"
    project.mkdir()
    (project / "thesis.tex").write_text("\\chapter{Results}")
    assert_one_line_error(run_cli("export", "toy", project, "--overwrite"),
                          "not a blip2-edge artifact directory", "even with --overwrite")
    assert (project / "thesis.tex").read_text() == "\\chapter{Results}"
    assert siblings(project) == ["my_project"]


def test_overwrite_never_replaces_a_user_directory_quantize(tmp_path, toy_artifacts):
    project = tmp_path / "my_project"
    project.mkdir()
    (project / "thesis.tex").write_text("\\chapter{Results}")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target in (project, notes):
        assert_one_line_error(run_cli("quantize", toy_artifacts, target, "--synthetic", "8", "--overwrite"),
                              "not a blip2-edge artifact directory", "even with --overwrite")
    assert (project / "thesis.tex").read_text() == "\\chapter{Results}" and notes.read_text() == "mine"
    assert siblings(project) == ["my_project", "notes.txt"]


def test_is_artifact_dir(tmp_path):
    assert is_artifact_dir(make_artifact_dir(tmp_path / "a", "x"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text('{"format": "something-else"}')
    assert not is_artifact_dir(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    assert not is_artifact_dir(tmp_path / "c")
