"""The bad-input corpus: every command-line subcommand that reads a path, against every class of
bad input that path can be (issue 25's probe, made permanent).

Each case asserts what a user may rely on: no traceback and no "internal error"; exit status 2
with exactly one line on stderr, `error: ...`, naming the culprit (doctor, whose contract is a
report, exits 1 with one `problem:` line); and nothing written outside the command's output.
A new subcommand joins by adding one entry to SLOTS; a new class of input, one to BAD_INPUTS.

The commands run in this process (`runtime.cli.main.main`), so the corpus costs no interpreter
start-up per case; what needs a process of its own (a user without root's power to read, stdout
closed or full, Ctrl-C) is at the end, through the real entry point.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from runtime.cli.main import main
from tests.conftest import REPO

# ---- bad inputs: name -> (kinds of argument it applies to, factory(tmp, fixtures) -> path) --------


def _truncated(tmp: Path, fx: dict, kind: str) -> Path:
    """A file (or directory) of the right kind, cut short."""
    if kind == "image":
        out = tmp / "cut.png"
        out.write_bytes(fx["image"].read_bytes()[:120])
    elif kind == "artifact":
        out = shutil.copytree(fx["retrieval"], tmp / "cut-art")
        manifest = out / "manifest.json"
        manifest.write_bytes(manifest.read_bytes()[:200])
    elif kind == "checkpoint":
        out = shutil.copytree(fx["checkpoint"], tmp / "cut-ckpt")
        weights = next(out.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "db":
        out = tmp / "cut.db"
        out.write_bytes(fx["db"].read_bytes()[:3000])
    elif kind == "video":
        out = tmp / "cut.mp4"
        out.write_bytes(fx["video"].read_bytes()[:3000])
    else:  # a folder: one whose only image is cut short
        out = tmp / "cut-folder"
        out.mkdir()
        (out / "a.png").write_bytes(fx["image"].read_bytes()[:120])
    return out


def _tampered(tmp: Path, fx: dict, kind: str) -> Path:
    """An artifact directory whose graph changed after its manifest was written."""
    out = shutil.copytree(fx["retrieval"], tmp / "tampered")
    with open(out / "vision.onnx", "ab") as f:
        f.write(b"\0")
    return out


def _fifo(tmp: Path, fx: dict, kind: str) -> Path:
    os.mkfifo(tmp / "fifo")
    return tmp / "fifo"


def _text(tmp: Path, fx: dict, kind: str) -> Path:
    out = tmp / {"image": "notes.png", "video": "notes.mp4"}.get(kind, "notes.txt")
    out.write_text("just some notes\n")
    return out


def _huge(tmp: Path, fx: dict, kind: str) -> Path:
    from tests.runtime.test_large_images import write_flat_png

    out = tmp / "huge.png"
    write_flat_png(out, 9000)  # 81 Mpx, over the default limit of 67 Mpx: refused from its header
    return out


ALL = ("image", "folder", "artifact", "checkpoint", "db", "video")
BAD_INPUTS = {
    "missing": (ALL, lambda tmp, fx, kind: tmp / "missing"),
    "non-utf8-name": (ALL, lambda tmp, fx, kind: Path(os.fsdecode(os.fsencode(tmp) + b"/caf\xe9"))),
    "directory": (("image", "artifact", "checkpoint", "db", "video"), lambda tmp, fx, kind: _mkdir(tmp / "a-folder")),
    "regular-file": (("folder", "artifact", "checkpoint"), _text),
    "wrong-type": (("image", "db", "video"), _text),
    "fifo": (ALL, _fifo),
    "device": (ALL, lambda tmp, fx, kind: Path("/dev/zero")),
    "empty": (("image", "db", "video"), lambda tmp, fx, kind: _touch(tmp / "empty.png")),
    "truncated": (ALL, _truncated),
    "tampered": (("artifact",), _tampered),
    "huge": (("image",), _huge),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _touch(path: Path) -> Path:
    path.touch()
    return path


# ---- the subcommands: name -> (kind of the bad argument, argv(bad, fixtures, out)) ---------------

SLOTS = {
    "caption IMAGE": ("image", lambda bad, fx, out: ["caption", fx["toy"], bad]),
    "caption ARTIFACTS": ("artifact", lambda bad, fx, out: ["caption", bad, fx["image"]]),
    "ask IMAGE": ("image", lambda bad, fx, out: ["ask", fx["toy"], bad, "-q", "what colour is it?"]),
    "match IMAGE": ("image", lambda bad, fx, out: ["match", fx["retrieval"], bad, "a red square"]),
    "match ARTIFACTS": ("artifact", lambda bad, fx, out: ["match", bad, fx["image"], "a red square"]),
    "profile ARTIFACTS": ("artifact", lambda bad, fx, out: ["profile", bad, "--synthetic", "1", "--runs", "1",
                                                            "--warmup", "0", "--new-tokens", "2"]),
    "profile --images": ("folder", lambda bad, fx, out: ["profile", fx["toy"], "--images", bad, "--runs", "1",
                                                         "--warmup", "0", "--new-tokens", "2"]),
    "doctor ARTIFACTS": ("artifact", lambda bad, fx, out: ["doctor", bad]),
    "build-engines ARTIFACTS": ("artifact", lambda bad, fx, out: ["build-engines", bad]),
    "quantize ARTIFACTS": ("artifact", lambda bad, fx, out: ["quantize", bad, out / "q", "--synthetic", "4"]),
    "quantize --images": ("folder", lambda bad, fx, out: ["quantize", fx["toy"], out / "q", "--images", bad,
                                                          "--num-calib", "4", "--held-out", "1"]),
    "index ARTIFACTS": ("artifact", lambda bad, fx, out: ["index", bad, fx["photos"], "--db", out / "p.db"]),
    "index PHOTOS": ("folder", lambda bad, fx, out: ["index", fx["retrieval"], bad, "--db", out / "p.db"]),
    "index --db": ("db", lambda bad, fx, out: ["index", fx["retrieval"], fx["photos"], "--db", bad]),
    "search DB": ("db", lambda bad, fx, out: ["search", bad, "a red square"]),
    "export CHECKPOINT": ("checkpoint", lambda bad, fx, out: ["export", bad, out / "art"]),
    "triton-repo ARTIFACTS": ("artifact", lambda bad, fx, out: ["triton-repo", bad, out / "repo"]),
    "watch SOURCE": ("video", lambda bad, fx, out: ["watch", fx["toy"], bad, "--srt", out / "v.srt"]),
    "watch ARTIFACTS": ("artifact", lambda bad, fx, out: ["watch", bad, fx["video"]]),
}
# (slot, input) pairs that are not bad for that command, with what it does instead.
NOT_BAD = {
    ("index --db", "missing"): "a new index is made there",
    ("index --db", "non-utf8-name"): "a new index is made there",
    ("index --db", "empty"): "an empty file is an empty SQLite database: the index is made in it",
    ("index PHOTOS", "truncated"): "a photo that cannot be decoded is listed, the others indexed (exit 0)",
}

CASES = [(slot, bad) for slot, (kind, _) in SLOTS.items() for bad, (kinds, _) in BAD_INPUTS.items()
         if kind in kinds and (slot, bad) not in NOT_BAD]


@pytest.fixture(scope="module")
def fixtures(toy_artifacts, retrieval_tiny_artifacts, tiny_checkpoint, tmp_path_factory) -> dict:
    from runtime import synthetic
    from runtime.index import IndexDb, update_index
    from runtime.retriever import Blip2Retriever

    root = tmp_path_factory.mktemp("good")
    image = root / "scene.png"
    synthetic.make_scenes(1, seed=7)[0][1].save(image)
    photos = root / "photos"
    photos.mkdir()
    Image.open(image).save(photos / "one.png")
    db = IndexDb.open(root / "photos.db", create=True)
    update_index(db, Blip2Retriever.from_artifacts(retrieval_tiny_artifacts), photos, retrieval_tiny_artifacts)
    db.close()
    video = root / "clip.mp4"
    if importlib.util.find_spec("av") is not None:  # the video extra
        from runtime.video.synthetic_video import Shot, write_video

        write_video(video, [Shot(synthetic.make_scenes(1, seed=7)[0][0], 1.0)])
    return {"toy": toy_artifacts, "retrieval": retrieval_tiny_artifacts, "checkpoint": tiny_checkpoint,
            "image": image, "photos": photos, "db": root / "photos.db", "video": video}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _culprit(bad: Path) -> str:
    """How the message names the bad input: its last component (the error may give the path of a
    file inside it, e.g. ARTIFACTS/manifest.json, or of the stage the tampering broke)."""
    return bad.name


@pytest.mark.parametrize("slot, bad", CASES, ids=[f"{s} <- {b}" for s, b in CASES])
def test_bad_input_is_one_line_naming_it(fixtures, tmp_path, capsysbinary, slot, bad):
    kind, argv = SLOTS[slot]
    if slot.startswith("watch") and importlib.util.find_spec("av") is None:
        pytest.skip("needs the video extra (av)")
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    path = BAD_INPUTS[bad][1](work, fixtures, kind)
    before = _tree(work)
    status = main([str(a) for a in argv(path, fixtures, out)])
    # bytes: a name that is not UTF-8 is written back as its own bytes
    err = os.fsdecode(capsysbinary.readouterr().err)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "internal error" not in err, err
    if slot.startswith("doctor"):  # a report: its problems are `problem:` lines, exit 1
        assert status == 1 and len([line for line in lines if line.startswith("problem:")]) == 1, err
    else:
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    named = [_culprit(path), "tampered"] if bad == "tampered" else [_culprit(path)]
    assert any(name in err for name in named) or (bad == "truncated" and kind == "checkpoint"
                                                 and "safetensors" in err), err
    assert _tree(work) == before  # nothing written beside the bad input
    assert _tree(out) <= {"p.db", "p.db-wal", "p.db-shm"}  # no half-written output


def test_the_corpus_covers_every_subcommand_that_reads_a_path():
    from runtime.cli.main import COMMANDS

    covered = {slot.split()[0] for slot in SLOTS}
    # demo: no input; make-model, make-images: an output; serve: its own tests
    reads_no_path = {"demo", "make-model", "make-images", "serve"}
    assert set(COMMANDS) - covered == reads_no_path
    assert len(CASES) >= 100


# ---- what needs a process of its own ------------------------------------------------------------


def _run(*args, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv reads anything")
@pytest.mark.parametrize("slot", ["caption IMAGE", "caption ARTIFACTS", "match IMAGE", "index --db", "search DB",
                                  "export CHECKPOINT"])
def test_an_unreadable_input_is_one_line(fixtures, tmp_path, slot):
    kind, argv = SLOTS[slot]
    source = {"image": fixtures["image"], "artifact": fixtures["retrieval"], "db": fixtures["db"],
              "checkpoint": fixtures["checkpoint"]}[kind]
    bad = tmp_path / f"locked-{source.name}"
    (shutil.copytree if source.is_dir() else shutil.copy)(source, bad)
    os.chmod(bad / "manifest.json" if kind == "artifact" else bad / "config.json" if kind == "checkpoint" else bad, 0)
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", "--bounding-set", caps, "--inh-caps", caps] if os.geteuid() == 0 else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "runtime.cli", *map(str, argv(bad, fixtures, tmp_path))],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert bad.name in lines[0], proc.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("slot", ["caption IMAGE", "match IMAGE", "search DB", "doctor ARTIFACTS"])
def test_a_full_stdout_is_one_line(fixtures, tmp_path, slot):
    good = {"caption IMAGE": ["caption", fixtures["toy"], fixtures["image"]],
            "match IMAGE": ["match", fixtures["retrieval"], fixtures["image"], "a red square"],
            "search DB": ["search", fixtures["db"], "a red square"],
            "doctor ARTIFACTS": ["doctor", fixtures["toy"], "--backend", "cpu"]}[slot]
    with open("/dev/full", "w") as full:
        proc = _run(*good, stdout=full)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: cannot write to standard output (No space left on device)"


@pytest.mark.parametrize("slot", ["caption IMAGE", "search DB"])
def test_a_closed_stdout_stops_quietly(fixtures, slot):
    good = {"caption IMAGE": ["caption", fixtures["toy"], fixtures["image"], fixtures["image"]],
            "search DB": ["search", fixtures["db"], "a red square"]}[slot]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", *map(str, good)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and err == b"", err


def test_ctrl_c_in_the_middle_of_a_run_exits_130(fixtures, tmp_path):
    """Mid-run: quantize makes and calibrates on 5000 images for a while; Ctrl-C leaves no output
    directory and no temporary sibling behind."""
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "quantize", str(fixtures["toy"]), str(tmp_path / "q"),
                             "--synthetic", "5000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    time.sleep(4)
    assert proc.poll() is None, "quantize ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err and not (tmp_path / "q").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]  # no temporary sibling left
