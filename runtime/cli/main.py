"""The `blip2-edge` command: one entry point, a subcommand per job.

Only the chosen subcommand's module is imported (`caption` never loads the exporter or the
calibration package); `blip2-edge --help` lists every subcommand from the table below. User
errors print one line and exit 2; bugs print one line and exit 1; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import io
import logging
import os
import sys
import warnings

from runtime.cli.start_up import INTERRUPTED_EXIT, hand_ctrl_c_to_the_command
from runtime.errors import Blip2EdgeError

# name -> (module whose register(sub) adds it, help line for the listing). A module's commands
# are contiguous here, in the order it registers them (tests/runtime/test_cli.py checks both).
COMMANDS = {
    "caption": ("runtime.cli.generate", "caption images"),
    "ask": ("runtime.cli.generate", "answer a question about images"),
    "match": ("runtime.cli.match", "ITM match probabilities (and ITC scores) of texts for an image"),
    "profile": ("runtime.profiling.cli", "per-stage latency of one or more artifact directories, side by side"),
    "build-engines": ("runtime.backends.tensorrt.cli", "build TensorRT engines on this device"),
    "doctor": ("runtime.doctor.cli", "report what this machine can run, and check it on an artifact directory"),
    "export": ("exporter.cli", "BLIP-2 checkpoint -> validated ONNX artifact directory"),
    "make-model": ("exporter.cli", "write a random-weight BLIP-2 checkpoint (tests, benchmarks)"),
    "demo": ("exporter.cli", "export and quantize the embedded toy model, caption synthetic images on the CPU, then search them"),
    "quantize": ("calibration.cli", "INT8 visual stages + weight-only LLM, with a fidelity report and gates"),
    "index": ("runtime.index.cli", "embed a photo folder into a searchable index (only new or changed files)"),
    "search": ("runtime.index.cli", "find the indexed photos that best match a text"),
    "watch": ("runtime.video.cli", "caption, question or watch for alerts in video files, streams and cameras"),
    "make-images": ("runtime.cli.make_images", "write a folder of synthetic test images (PNG, a coloured square each)"),
    "serve": ("runtime.serving.cli", "serve artifact directories on Triton Inference Server"),
    "triton-repo": ("runtime.serving.cli", "write a Triton model repository for artifact directories"),
}
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for `cat` or `grep` cut off by `head`
ESCAPE = "blip2edge.escape"


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in argv: the top-level options (--debug, --help) take no value, so
    it is the first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser of the command chosen in `argv`; every other command is a placeholder
    with its help line (enough for the listing and for argparse's 'invalid choice')."""
    parser = argparse.ArgumentParser(
        prog="blip2-edge", description="Export, quantize and run BLIP-2 on edge devices."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen_module = COMMANDS.get(chosen_command(argv or []), (None,))[0]
    for name, (module, helptext) in COMMANDS.items():
        if name in sub.choices:
            continue
        if module != chosen_module:
            sub.add_parser(name, help=helptext)
            continue
        importlib.import_module(module).register(sub)
        for command, p in sub.choices.items():
            if COMMANDS.get(command, (None,))[0] == module:
                # Also after the command (`blip2-edge export A B --debug`); SUPPRESS keeps a
                # top-level --debug from being reset by the subcommand's default.
                p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show tracebacks and debug logs")
    return parser


def _escape_unencodable(err: UnicodeError):
    """Codec error handler for stdout/stderr: a character the stream cannot encode must never
    abort a run. Undecodable bytes of a file name (surrogate escapes) are written back as the
    original bytes, anything else as a backslash escape."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    out = b"".join(bytes([ord(c) - 0xDC00]) if 0xDC80 <= ord(c) <= 0xDCFF else c.encode("ascii", "backslashreplace")
                   for c in err.object[err.start:err.end])
    return out, err.end


def safe_text_streams() -> None:
    codecs.register_error(ESCAPE, _escape_unencodable)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=ESCAPE)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class OutputError(Blip2EdgeError):
    """Standard output cannot be written (a full disk or device, an I/O error)."""


class _GuardedStdout:
    """sys.stdout while a command runs: a failed write or flush (not a closed pipe, which stops
    quietly) becomes one OutputError line instead of an internal error."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write to standard output ({exc.strerror or exc})") from None

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence_stdout() -> None:
    """Points stdout at /dev/null so that the interpreter's final flush of what could not be
    written does not complain again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file descriptor (an in-process caller)
        pass


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, or an ImportError a library raised because Ctrl-C interrupted its import
    (numpy's "IMPORTANT: PLEASE READ THIS")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        safe_text_streams()
        # Building the parser imports the chosen command's module (numpy, onnxruntime...): Ctrl-C
        # at start-up lands here when main runs in-process (the process entry point ends at once).
        args = build_parser(argv).parse_args(argv)
    except BaseException as exc:
        if _interrupted(exc):
            print("interrupted", file=sys.stderr)
            return INTERRUPTED_EXIT
        raise
    debug = args.debug = bool(getattr(args, "debug", False))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    if not debug:
        warnings.showwarning = _print_warning
    stdout = sys.stdout
    sys.stdout = _GuardedStdout(stdout)
    try:
        hand_ctrl_c_to_the_command()
        status = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe or a full disk shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as `cat` does.
        _silence_stdout()
        return SIGPIPE_EXIT
    except Exception as exc:
        if _interrupted(exc):
            print("interrupted", file=sys.stderr)
            return INTERRUPTED_EXIT
        if debug:
            raise
        # Only our own error classes are user errors (OptionError for bad values): a plain
        # ValueError, from numpy or from us, is a bug.
        if isinstance(exc, OutputError):
            _silence_stdout()
        if isinstance(exc, Blip2EdgeError):
            print(f"error: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", 2)
        # A bug, not a user error: say so, keep the traceback for --debug.
        print(f"internal error: {type(exc).__name__}: {_one_line(exc)[:300]} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    raise SystemExit(main())
