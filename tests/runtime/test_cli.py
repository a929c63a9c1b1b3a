"""`blip2-edge caption` / `ask`: inputs, bad images, output formats, exit status; the entry point's
handling of pipes, encodings, --debug and error classes; subcommands loaded only when chosen."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from runtime import synthetic
from runtime.cli import main as cli
from runtime.cli.main import COMMANDS, SIGPIPE_EXIT
from runtime.errors import install_command
from tests.conftest import REPO, run_cli


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
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and "top" in err[0], proc.stderr
    assert "(0, 1]" in err[0]
    proc = run_cli("caption", tmp_path / "nope", tmp_path / "img0.png")
    assert proc.returncode == 2 and "not an artifact directory" in proc.stderr
    proc = run_cli("caption", toy_artifacts, tmp_path / "img0.png", "--device", "cuda")
    assert proc.returncode == 2 and install_command("gpu") in proc.stderr


# ---- pipes, encodings, error classes, --debug, lazy subcommands ---------------------------------

def run_cli_bytes(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """run_cli, but with raw bytes out (file names need not be valid text) and a chosen env."""
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], capture_output=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_closed_pipe_stops_quietly(toy_artifacts, tmp_path):
    write_scenes(tmp_path, 3)
    for extra in ((), ("--stream",)):
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "caption", str(toy_artifacts), str(tmp_path),
                                 *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        try:
            assert proc.stdout.read(1) == b"/"  # `| head -c1`: one byte read, then the pipe closes
            proc.stdout.close()
            _, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == SIGPIPE_EXIT and err == b"", (extra, err)


def test_undecodable_file_name_with_strict_ascii_stdout(toy_artifacts, tmp_path):
    write_scenes(tmp_path, 3)
    os.rename(tmp_path / "img0.png", os.path.join(os.fsencode(tmp_path), b"a\xffname.png"))
    for env in ({"PYTHONIOENCODING": "ascii:strict"}, {"LC_ALL": "C", "PYTHONIOENCODING": "ascii:strict"}):
        proc = run_cli_bytes("caption", toy_artifacts, tmp_path, "--prompt", "a", env=env)
        assert proc.returncode == 0, proc.stderr
        names = [l.split(b": ", 1)[0].rsplit(b"/", 1)[1] for l in proc.stdout.splitlines()]
        assert names == [b"a\xffname.png", b"img1.png", b"img2.png"]  # the name's own bytes, every image
        proc = run_cli_bytes("caption", toy_artifacts, tmp_path, "--json", env=env)
        rows = [json.loads(l) for l in proc.stdout.splitlines()]
        assert proc.returncode == 0 and os.fsencode(rows[0]["path"]).endswith(b"a\xffname.png")


def test_undecodable_question_is_a_one_line_error(toy_artifacts, tmp_path):
    write_scenes(tmp_path, 1)
    for flag in ("-q", "--question"):
        proc = run_cli_bytes("ask", toy_artifacts, tmp_path / "img0.png", flag, os.fsdecode(b"what \xff?"))
        err = proc.stderr.decode().strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: --question"), proc.stderr
        assert "\\xff" in err[0]
    proc = run_cli_bytes("caption", toy_artifacts, tmp_path / "img0.png", "--prompt", os.fsdecode(b"\xfe"))
    assert proc.returncode == 2 and proc.stderr.decode().startswith("error: --prompt"), proc.stderr


def test_only_our_errors_are_user_errors(monkeypatch, capsys):
    """An OptionError from our option checks is a user error (one line, exit 2); a plain
    ValueError raised inside numpy or a builtin (a bug of ours) is an internal error (exit 1)."""
    from runtime.profiling.profiler import ProfileOptions

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it

    def main_running(body):
        parser = argparse.ArgumentParser()
        parser.set_defaults(run=lambda args: body())
        monkeypatch.setattr(cli, "build_parser", lambda argv: parser)
        status = cli.main([])
        return status, capsys.readouterr().err.splitlines()

    status, err = main_running(lambda: ProfileOptions(runs=0))
    assert (status, err) == (2, ["error: --runs must be >= 1, got 0"])
    for bug in (lambda: np.zeros(6).reshape(4), lambda: int("x")):
        status, err = main_running(bug)
        assert status == 1 and len(err) == 1 and err[0].startswith("internal error: ValueError: "), err


def test_option_error_exit_status(toy_artifacts, tmp_path):
    write_scenes(tmp_path, 1)
    for args, fragment in ((("--batch-size", "0"), "--batch-size"), (("--max-image-pixels", "0"), "--max-image-pixels")):
        proc = run_cli("caption", toy_artifacts, tmp_path / "img0.png", *args)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {fragment}"), proc.stderr


def test_debug_is_only_the_flag_never_an_argument_value(toy_artifacts, tmp_path):
    scenes = write_scenes(tmp_path, 1)
    proc = run_cli("ask", toy_artifacts, tmp_path / "img0.png", "--question=--debug")
    assert proc.returncode == 0 and proc.stdout.startswith(str(tmp_path / "img0.png")), proc.stderr
    proc = run_cli("caption", toy_artifacts, "--", "--debug")  # an image named --debug
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --debug: no such file or directory"
    proc = run_cli("caption", toy_artifacts, tmp_path / "img0.png", "--prompt", "--debug")
    assert proc.returncode == 2 and "--prompt: expected one argument" in proc.stderr
    for argv in (("--debug", "caption", tmp_path / "nope", tmp_path / "img0.png"),
                 ("caption", tmp_path / "nope", tmp_path / "img0.png", "--debug")):
        proc = run_cli(*argv)
        assert proc.returncode != 0 and "Traceback" in proc.stderr, argv
    proc = run_cli("caption", toy_artifacts, tmp_path / "img0.png", "--debug")
    assert proc.returncode == 0 and proc.stdout.strip().endswith(scenes[0].caption)


def test_caption_loads_neither_exporter_nor_calibration(toy_artifacts, tmp_path):
    write_scenes(tmp_path, 1)
    code = textwrap.dedent(f"""
        import sys
        from runtime.cli.main import main
        assert main(["caption", {str(toy_artifacts)!r}, {str(tmp_path / "img0.png")!r}]) == 0
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"exporter", "calibration", "torch",
                                                                   "transformers", "onnx"}})
        print("loaded:", loaded, file=sys.stderr)
        assert not loaded
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_help_lists_every_subcommand_from_its_module():
    """runtime/cli/main.py's table (the listing) names exactly the commands each module registers,
    in its order, with its help line."""
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\b", proc.stdout, re.M), name
    for module in dict.fromkeys(m for m, _ in COMMANDS.values()):
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        registered = [(a.dest, a.help) for a in sub._choices_actions]
        assert registered == [(n, h) for n, (m, h) in COMMANDS.items() if m == module], module


def test_public_api_names_resolve_and_errors_load_no_inference_engine():
    code = ("import sys, runtime, runtime.errors, runtime.preprocess\n"
            "assert runtime.OptionError is runtime.errors.OptionError and issubclass(runtime.OptionError, ValueError)\n"
            "assert runtime.ImageWarning is runtime.preprocess.ImageWarning\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'torch', 'onnx')]\n"
            "assert all(getattr(runtime, name) for name in runtime.__all__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_profiling_reference_does_not_import_the_profiler_back():
    code = "import sys, exporter.reference; assert not [m for m in sys.modules if m.startswith('runtime.profiling')]"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_deep_image_is_captioned_with_a_one_line_warning(toy_artifacts, tmp_path):
    Image.fromarray(np.full((64, 64), 50000, np.uint16)).save(tmp_path / "deep.png")  # 16-bit greyscale PNG
    proc = run_cli("caption", toy_artifacts, tmp_path / "deep.png")
    assert proc.returncode == 0 and proc.stdout.startswith(str(tmp_path / "deep.png")), proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {tmp_path / 'deep.png'}: mode I"), proc.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_stdout_is_one_line_and_a_non_zero_exit(toy_artifacts, tmp_path):
    """`> /dev/full`: every write fails with ENOSPC; each command says so in one line (no
    internal error, no complaint of the interpreter's final flush)."""
    write_scenes(tmp_path, 2)
    for extra in ((), ("--json",), ("--stream",)):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "runtime.cli", "caption", str(toy_artifacts), str(tmp_path),
                                   *extra], stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert proc.stderr == "error: cannot write to standard output (No space left on device)\n", (extra, proc.stderr)


@pytest.mark.parametrize("raised", [KeyboardInterrupt(), "numpy"])
def test_ctrl_c_while_the_command_module_is_imported_exits_130(monkeypatch, capsys, raised):
    """Building the parser imports the chosen command's module (numpy, onnxruntime): Ctrl-C there,
    or the ImportError numpy raises when Ctrl-C interrupts its own import, is 'interrupted'."""
    def interrupted_import(name):
        if raised == "numpy":
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise ImportError("IMPORTANT: PLEASE READ THIS FOR ADVICE ON HOW TO SOLVE THIS ISSUE!")  # noqa: B904
        raise raised

    monkeypatch.setattr(importlib, "import_module", interrupted_import)
    assert cli.main(["index", "model", "photos", "--db", "p.db"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"),
                                     reason="finds the moment of start-up in /proc/<pid>/maps")


def _index_on_missing_folders(tmp_path) -> list[str]:
    """`index` on a model and photo folder that do not exist: it imports numpy and onnxruntime,
    then fails with "not a directory" (exit 2)."""
    return ["index", str(tmp_path / "model"), str(tmp_path / "photos"), "--db", str(tmp_path / "p.db")]


def _start_index_on_missing_folders(tmp_path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", *_index_on_missing_folders(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, **popen)


def _wait_until_mapped(proc, library: str, timeout: float = 120) -> bool:
    """True once the child process has `library` mapped (it is importing it), False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if library in (pathlib.Path("/proc") / str(proc.pid) / "maps").read_text():
                return True
        except OSError:
            pass
        time.sleep(0.002)
    return False


@needs_proc_maps
@pytest.mark.parametrize("delay", [0, 0.03, 0.1, 0.3, 0.6])
def test_ctrl_c_at_any_moment_of_start_up_has_no_traceback(tmp_path, delay):
    """The real signal, sent while `index` imports numpy, then onnxruntime and its modules (or, at the
    longer delays on a fast machine, once it has failed on the missing folder). Timed from the moment
    numpy's extension is mapped, not from the process's start: before the entry point's first line the
    interpreter's own start-up (site, .pth files) prints its own traceback, which no program can catch;
    under load that phase alone took longer than any fixed delay."""
    proc = _start_index_on_missing_folders(tmp_path)
    reached = _wait_until_mapped(proc, "_multiarray_umath")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert reached, (proc.returncode, err)
    # 2: the command had failed on the missing folder already; -SIGINT: the signal came while the
    # interpreter was exiting after that, past any handler (no traceback either way).
    assert proc.returncode in (130, 2, -signal.SIGINT) and "Traceback" not in err and "internal error" not in err, err
    assert "Exception ignored" not in err, err  # a KeyboardInterrupt swallowed inside a callback, command went on
    if proc.returncode == 130:
        assert err.strip().splitlines()[-1] == "interrupted", err
    else:
        assert err.startswith("error: ") and "not a directory" in err, (proc.returncode, err)


@needs_proc_maps
def test_a_process_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """A background job of a script (SIGINT ignored from its start) is not ended by the start-up handler."""
    proc = _start_index_on_missing_folders(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert _wait_until_mapped(proc, "_multiarray_umath")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("error: ") and "not a directory" in err, (proc.returncode, err)


def test_the_entry_point_sets_its_ctrl_c_handler_before_importing_anything_else():
    """Whatever the process entry imports before its handler is set is a window where Ctrl-C prints a
    traceback: only our two (empty) package __init__ files, the handler's module and `signal`."""
    code = ("import sys; before = set(sys.modules); import runtime.cli.start_up; "
            "print(*sorted(set(sys.modules) - before))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) <= {"runtime", "runtime.cli", "runtime.cli.start_up", "signal"}, proc.stdout
    entry = (REPO / "runtime" / "cli" / "__main__.py").read_text()
    assert entry.index("end_at_once_on_ctrl_c()") < entry.index("from runtime.cli.main import main")


def test_main_in_process_leaves_the_callers_ctrl_c_handler_alone(tmp_path, capsys):
    """Only the process entry point ends the process on Ctrl-C; a caller of main() keeps KeyboardInterrupt."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert cli.main(_index_on_missing_folders(tmp_path)) == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    lambda art, out: ("doctor", art, "--json", out),
    lambda art, out: ("quantize", art, out.parent.parent / "q", "--synthetic", "4", "--calibration-cache", out),
    lambda art, out: ("build-engines", art, "--timing-cache", out),
    lambda art, out: ("profile", art, "--synthetic", "1", "--runs", "1", "--json", out),
])
def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(toy_artifacts, tmp_path, command):
    out = tmp_path / "no" / "such" / "dir" / "out.json"
    proc = run_cli(*command(toy_artifacts, out))
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "does not exist" in proc.stderr, proc.stderr
    assert not (tmp_path / "no").exists()


def test_messages_say_what_is_actually_wrong(toy_artifacts, tmp_path):
    """A FIFO or a device given as an image is not 'missing' or 'empty', and a file given as the
    artifact directory is not 'missing': each message names what the path is."""
    from runtime.errors import ImageError
    from runtime.pipeline import Blip2Pipeline

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    write_scenes(tmp_path / "imgs", 1)
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
        proc = run_cli("caption", toy_artifacts, path)
        assert proc.returncode == 2 and proc.stderr == f"error: {path}: not an image file but {kind}\n", proc.stderr
        with pytest.raises(ImageError, match=f"^{path}: not an image file but {kind}$"):
            Blip2Pipeline.from_artifacts(toy_artifacts).caption([path])
    note = tmp_path / "notes.txt"
    note.write_text("not a model")
    proc = run_cli("caption", note, tmp_path / "imgs")
    assert proc.stderr == f"error: {note}: not an artifact directory (a regular file)\n", proc.stderr


def test_end_of_sequence_ids_outside_the_vocabulary_are_refused(toy_artifacts):
    from runtime.generation.options import GenerationOptionError
    from runtime.pipeline import Blip2Pipeline

    pipe = Blip2Pipeline.from_artifacts(toy_artifacts)
    vocab = pipe.model["vocab_size"]
    image = synthetic.make_scenes(1, seed=3)[0][1]
    for call in (lambda: pipe.caption([image], eos_token_ids=(vocab,), min_new_tokens=2),
                 lambda: list(pipe.stream(image, eos_token_ids=(2, 99999)))):
        with pytest.raises(GenerationOptionError, match=f"eos_token_ids must be ids below the model's vocabulary "
                                                        f"size {vocab}, got {vocab}|got 99999"):
            call()
    assert pipe.caption([image], eos_token_ids=(vocab - 1,))[0].text  # the last id is a valid one


@pytest.mark.parametrize("flags, message", [
    (("--stream", "--json"), "--stream prints text as it is generated and --json one object per image"),
    (("--stream", "--batch-size", "4"), "--stream runs one image at a time"),
])
def test_stream_with_flags_it_cannot_honour_is_refused(toy_artifacts, tmp_path, flags, message):
    write_scenes(tmp_path, 2)
    proc = run_cli("caption", toy_artifacts, tmp_path, *flags)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith(f"error: {message}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_export_prints_no_notice_about_the_image_processor_it_chose(tmp_path):
    proc = run_cli("export", "toy", tmp_path / "toy")
    assert proc.returncode == 0, proc.stderr
    assert "slow image processor" not in proc.stderr + proc.stdout
