"""User-facing errors: each prints as one line and exits with status 2 from the CLI.

Library code raises these and never calls `sys.exit`; the CLI turns them into a message and an
exit status, with a traceback only under `--debug`.
"""

from pathlib import Path


class Blip2EdgeError(Exception):
    """An error the user can fix: bad input, a missing file, a missing extra."""

    exit_code = 2


class ArtifactError(Blip2EdgeError):
    """The artifact directory is incomplete, corrupted or of an unknown schema."""


class ImageError(Blip2EdgeError):
    """An image cannot be read or decoded."""


class VideoError(Blip2EdgeError):
    """A video file or stream cannot be opened or decoded, or sends no frame in time."""


class OptionError(Blip2EdgeError, ValueError):
    """An option or argument has a value outside what it accepts. Also a ValueError, so callers
    that catch ValueError keep working; the CLI reports it as a user error (a raw ValueError
    from a library is a bug, reported as an internal error)."""


def install_command(extras: str = "") -> str:
    """The pip command that installs blip2-edge with `extras` ("cpu", "gpu,tensorrt") as this copy
    was installed: blip2-edge is not on a package index yet, so from a checkout (an editable
    install, or this source tree) it names the checkout, which works as printed."""
    spec = f"[{extras}]" if extras else ""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "runtime" / "__init__.py").is_file():
        return f"pip install -e '{checkout}{spec}'"
    return f"pip install 'blip2-edge{spec}'"


class MissingExtraError(Blip2EdgeError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, what: str):
        super().__init__(f"{what} needs the '{package}' package: {install_command(extra)}")


def require(module: str, extra: str, what: str):
    """Imports an optional module, or raises a MissingExtraError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module.split(".")[0], extra, what) from exc


def require_installed(module: str, extra: str, what: str) -> None:
    """A MissingExtraError naming the extra unless `module` is installed; imports nothing (for a
    package another process will use, as `profile --reference` runs torch in a child)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(module, extra, what)
