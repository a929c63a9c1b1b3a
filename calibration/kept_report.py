"""Keeping the fidelity report of a run that failed its gates beside OUT_DIR.

OUT_DIR itself is never written then, so the report goes to `OUT.fidelity.json`: a name the
user may already use. It is written whole (a temporary file, then one rename or link) and only
where nothing is, or where a report of an earlier run is; a file, link, FIFO or directory of
anyone else's is left alone and the next free name `OUT.fidelity-N.json` is taken instead.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from runtime.artifact.atomic_file import write_temp
from runtime.artifact.verified_files import read_bounded
from runtime.errors import ArtifactError

# What fidelity_report() returns, with the gate results added by quantize().
REPORT_KEYS = frozenset({"held_out_images", "stages", "end_to_end", "gates"})
MAX_REPORT_BYTES = 16 << 20  # a report is a few KB; a bigger file is not one of ours
MAX_NAMES = 100


def report_paths(out: Path):
    """OUT.fidelity.json, then OUT.fidelity-1.json ... OUT.fidelity-99.json."""
    yield out.with_name(f"{out.name}.fidelity.json")
    for i in range(1, MAX_NAMES):
        yield out.with_name(f"{out.name}.fidelity-{i}.json")


def is_earlier_report(path: Path) -> bool:
    """A regular file (not a link) holding a JSON object with a fidelity report's keys."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        raw = read_bounded(path, MAX_REPORT_BYTES)  # never blocks, even if a FIFO is swapped in after the lstat
    except (OSError, ArtifactError):
        return False
    try:
        data = json.loads(raw) if len(raw) <= MAX_REPORT_BYTES else None
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and REPORT_KEYS <= data.keys()


def _place(tmp: str, path: Path) -> bool:
    """Puts the finished `tmp` at `path` if nothing is there; False if something is."""
    try:
        os.link(tmp, path)  # atomic, and never replaces: EEXIST if the name was taken meanwhile
        return True
    except FileExistsError:
        return False
    except OSError:
        # No hard links on this filesystem: rename, after a check that leaves a narrow window
        # (the run holds OUT_DIR's lock, so only another program could take the name in it).
        if os.path.lexists(path):
            return False
        os.rename(tmp, path)
        return True


def keep_report(out: Path, report: dict) -> tuple[Path | None, str]:
    """Writes `report` beside `out`. Returns (the path written, a note for the error message):
    the path is None, and the note says why, when no file could be written."""
    out = Path(os.path.abspath(out))
    text = json.dumps(report, indent=2) + "\n"
    try:
        tmp = write_temp(out.parent, f".{out.name}.fidelity.", text.encode("utf-8"))
    except OSError as exc:
        return None, f"report not kept: cannot write in {out.parent} ({exc.strerror})"
    try:
        taken = []
        for path in report_paths(out):
            if is_earlier_report(path):
                os.replace(tmp, path)  # replaces the name only: a link's target is never written
            elif os.path.lexists(path) or not _place(tmp, path):
                taken.append(path)
                continue
            note = f" ({taken[0].name} is not a report of ours: left untouched)" if taken else ""
            return path, f"report: {path}{note}"
        return None, f"report not kept: {taken[0].name} ... {taken[-1].name} are all taken by other files"
    except OSError as exc:
        return None, f"report not kept: cannot write {exc.filename or out.parent} ({exc.strerror})"
    finally:
        try:
            os.unlink(tmp)  # still there after a link, or after a failure
        except OSError:
            pass
