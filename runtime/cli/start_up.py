"""Ctrl-C while a `blip2-edge` process starts: "interrupted", exit 130, at once, from its first line.

Starting a command imports its modules (numpy, onnxruntime, sometimes torch: seconds on a small
board). A KeyboardInterrupt raised there surfaces wherever the interpreter happens to be: inside an
import (importlib's traceback, before `main` can catch anything), inside a weakref callback that
CPython reports as "Exception ignored" before carrying on with the command as if no key had been
pressed, or as numpy's ImportError. Nothing has been written yet, so the process entry point
(runtime/cli/__main__.py) ends the process from the handler itself; `main` hands Ctrl-C back to
Python's own handler just before the command runs, so that a command's clean-up (no half-written
artifact directory) still runs on KeyboardInterrupt. In-process callers of `main` keep their handler.
"""

import os
import signal

INTERRUPTED_EXIT = 130


def _end_interrupted(signum, frame) -> None:
    os.write(2, b"interrupted\n")  # not print(): sys.stderr may be mid-write or replaced
    os._exit(INTERRUPTED_EXIT)


def end_at_once_on_ctrl_c() -> None:
    # Only over Python's own handler: a process started with SIGINT ignored (a background job of a
    # script, nohup) keeps ignoring it.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _end_interrupted)


def hand_ctrl_c_to_the_command() -> None:
    """Python's KeyboardInterrupt from here on, if the entry point had set the start-up handler."""
    if signal.getsignal(signal.SIGINT) is _end_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
