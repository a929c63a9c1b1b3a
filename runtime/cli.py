"""The `blip2-edge` command: one entry point, a subcommand per job.

Each subcommand module registers its parser and imports its heavy dependencies only when it
runs. User errors print one line and exit 2; tracebacks appear only with --debug.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from runtime.errors import Blip2EdgeError

# (module, what it adds). The exporter's module is imported when the parser is built, not when
# the runtime is imported, and itself imports torch only inside its commands.
SUBCOMMAND_MODULES = ("runtime.cli_generate", "runtime.profiling.cli", "runtime.backends.tensorrt.cli",
                      "exporter.cli", "calibration.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2-edge", description="Export, quantize and run BLIP-2 on edge devices."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (Blip2EdgeError, ValueError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: say so, keep the traceback for --debug
        if debug:
            raise
        print(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
