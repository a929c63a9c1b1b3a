"""Writing an artifact directory atomically: into a temporary sibling, renamed into place only
when complete. Shared by the exporter and calibration (the writers of the contract).

What it promises the user:
- nothing appears at OUT_DIR unless the run succeeded, and a failed run leaves OUT_DIR as it was;
- only a blip2-edge artifact directory (one holding our manifest.json) is ever replaced, even
  with --overwrite, and only if it is still one at the moment of the swap;
- something created at OUT_DIR by someone else during the run is refused, never replaced;
- two blip2-edge processes never write one OUT_DIR at once (a lock on a sibling file);
- leftovers of a run killed with -9 are cleaned up by the next write to the same OUT_DIR.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from runtime.artifact.manifest import FORMAT, MANIFEST, MAX_MANIFEST_BYTES
from runtime.artifact.verified_files import read_bounded
from runtime.errors import ArtifactError, Blip2EdgeError

log = logging.getLogger(__name__)

# Graphs whose weights exceed this keep them in one <graph>.onnx.data: protobuf cannot hold a
# message over 2 GiB, so stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000

def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _partial_path(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}.partial-{pid}"


def _old_path(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}.old-{pid}"


def is_artifact_dir(path: Path) -> bool:
    """A real directory (not a link to one) holding a blip2-edge manifest.json."""
    path = Path(path)
    manifest = path / MANIFEST
    if path.is_symlink() or not path.is_dir() or manifest.is_symlink() or not manifest.is_file():
        return False
    try:  # bounded, and never blocks on a FIFO swapped in after the check above
        raw = read_bounded(manifest, MAX_MANIFEST_BYTES)
        data = json.loads(raw) if len(raw) <= MAX_MANIFEST_BYTES else None
    except (ArtifactError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def check_target(out: Path, overwrite: bool) -> None:
    """OUT_DIR may be absent, or (with --overwrite) a blip2-edge artifact directory. Anything
    else, a file or a directory of the user's, is refused even with --overwrite."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise Blip2EdgeError(f"{out}: already exists; pass --overwrite to replace it")
    if not is_artifact_dir(out):
        what = "a directory" if out.is_dir() and not out.is_symlink() else "a file or a link"
        raise Blip2EdgeError(f"{out}: {what}, not a blip2-edge artifact directory (no {MANIFEST} of ours); "
                             "refusing to replace it even with --overwrite")


# ---- renames that never replace what they should not ---------------------------------------

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
except (AttributeError, OSError):
    _renameat2 = None


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags). False when the kernel, libc or filesystem lacks it (the caller
    falls back); OSError for a real failure (EEXIST for NOREPLACE onto something)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _move_into_place(tmp: Path, out: Path) -> None:
    """tmp -> out, where out must not exist (not even as an empty directory)."""
    try:
        if _rename2(tmp, out, RENAME_NOREPLACE):
            return
        # No renameat2: rename(2) refuses a file or a non-empty directory at `out` but silently
        # replaces an empty one; the lock and this re-check leave only that narrow window.
        if os.path.lexists(out):
            raise FileExistsError(errno.EEXIST, "exists", str(out))
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise Blip2EdgeError(f"{out}: created by someone else while this run was writing; left untouched, "
                                 "nothing written") from None
        raise


def _swap_into_place(tmp: Path, out: Path) -> Path:
    """Replaces the artifact directory `out` by `tmp`; returns where the old one now is.

    With RENAME_EXCHANGE the swap is one atomic step; without it, two renames, and a failure of
    the second puts the old directory back. Either way what was swapped out is checked again
    (someone may have replaced `out` since the last check): if it is not ours, it goes back."""
    if _rename2(tmp, out, RENAME_EXCHANGE):
        old = tmp

        def undo():
            _rename2(tmp, out, RENAME_EXCHANGE)
    else:
        old = _old_path(out, os.getpid())
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # the user's previous output comes back
            raise

        def undo():
            os.rename(out, tmp)
            os.rename(old, out)
    if not is_artifact_dir(old):
        undo()
        raise Blip2EdgeError(f"{out}: replaced by something else while this run was writing; left untouched, "
                             "nothing written")
    return old


# ---- the lock and stale leftovers ------------------------------------------------------------

@contextmanager
def _exclusive_lock(out: Path) -> Iterator[None]:
    """An flock on `.<name>.lock` beside OUT_DIR for the whole run. The file is removed at the
    end; a process that locked a file already removed notices (other inode) and tries again."""
    path = _lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise Blip2EdgeError(f"{out.parent}: cannot write there ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Blip2EdgeError(f"{out}: another blip2-edge process is writing this OUT_DIR "
                                 f"(lock {path.name}); wait for it or choose another directory") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Removes `.<name>.partial-PID` / `.<name>.old-PID` left by runs killed before they could
    clean up. Called with the lock held, so no live blip2-edge run owns them; a PID still alive
    is left alone all the same. A stranded old output with no OUT_DIR is put back, not removed."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(out) and is_artifact_dir(entry):
            log.warning("%s: restored from %s, left by an interrupted run", out, entry.name)
            entry.rename(out)
            continue
        log.info("removing %s, left by an interrupted run (pid %s)", entry, m.group(2))
        shutil.rmtree(entry, ignore_errors=True)


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Puts the finished `tmp` at `out`, checking `out` again: it may have appeared or changed
    while the run worked."""
    if not os.path.lexists(out):
        _move_into_place(tmp, out)
        return
    if not (overwrite and is_artifact_dir(out)):
        raise Blip2EdgeError(f"{out}: created or replaced by someone else while this run was writing; "
                             "left untouched, nothing written")
    old = _swap_into_place(tmp, out)
    try:
        shutil.rmtree(old)
    except OSError as exc:  # the new output is in place: a leftover is worth a warning, not a failure
        log.warning("%s is written, but its previous version could not be removed from %s (%s)", out, old, exc)


@contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yields an empty temporary sibling of `out` to write into. If the block succeeds it
    becomes `out` (an existing artifact directory `out` is swapped out, then removed); if it
    fails, it is removed and `out` is left as it was.

    The lock is held from the start, so wrap the whole run (model loading included) in it: a
    second writer to the same OUT_DIR fails at once instead of after its work."""
    out = Path(os.path.abspath(out))  # "." or "x/.." have no name to put a sibling beside
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Blip2EdgeError(f"{out.parent}: cannot create the output's parent directory ({exc.strerror})") from None
    with _exclusive_lock(out):
        clean_stale(out)
        check_target(out, overwrite)
        tmp = _partial_path(out, os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            _commit(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
