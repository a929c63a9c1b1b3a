"""A 12000x12000 PNG is a few hundred KB on disk and 432 MB decoded: refused before decoding by
default; with a raised limit each image is shrunk as soon as it is decoded, so a batch never
holds several full-size images. Memory is measured as the process's peak RSS, not time."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.conftest import REPO

SIDE = 12000
DECODED_MB = SIDE * SIDE * 3 / 2**20  # one decoded RGB image: 412 MiB

# Runs the real CLI in a fresh interpreter and reports its own peak RSS: VmHWM belongs to the
# process image, while getrusage's ru_maxrss keeps the forking test process's RSS across exec.
PEAK_RSS = """
import sys
from runtime.cli.main import main
rc = main(sys.argv[1:])
sys.stdout.flush()
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(f"peak_rss_mb={int(hwm.split()[1]) / 1024:.0f}", file=sys.stderr)
sys.exit(rc)
"""
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS from Linux /proc")


def write_flat_png(path: Path, side: int, rgb=(200, 30, 30)) -> None:
    """A side x side RGB PNG of one colour, written row by row (never whole in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + bytes(rgb) * side  # filter type 0, then the pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def big_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.png"
    write_flat_png(path, SIDE)
    return path


def caption_with_peak_rss(*args) -> tuple[subprocess.CompletedProcess, float]:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, "caption", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    peak = [l for l in proc.stderr.splitlines() if l.startswith("peak_rss_mb=")]
    assert peak, proc.stderr
    return proc, float(peak[-1].split("=")[1])


def test_refused_from_the_header_by_default(toy_artifacts, big_png):
    assert big_png.stat().st_size < 1_000_000
    proc, peak_mb = caption_with_peak_rss(toy_artifacts, big_png)
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "big.png" in errors[0] and "12000x12000" in errors[0], proc.stderr
    assert "--max-image-pixels" in errors[0] and "Traceback" not in proc.stderr
    assert peak_mb < DECODED_MB, peak_mb  # never decoded


def test_raised_limit_processes_a_batch_one_full_size_image_at_a_time(toy_artifacts, big_png, tmp_path):
    folder = tmp_path / "bigs"
    folder.mkdir()
    for i in range(3):
        (folder / f"b{i}.png").hardlink_to(big_png)
    proc, peak_mb = caption_with_peak_rss(toy_artifacts, folder, "--batch-size", "3",
                                          "--max-image-pixels", str(SIDE * SIDE))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [l.split(": ", 1)[0].rsplit("/", 1)[1] for l in lines] == ["b0.png", "b1.png", "b2.png"]
    assert len({l.split(": ", 1)[1] for l in lines}) == 1  # the same picture, the same caption
    assert "warning" not in proc.stderr  # Pillow's bomb warning would only repeat our limit
    # Holding the three decoded images until the batch runs needs over 3 x 412 MiB.
    assert peak_mb < 2 * DECODED_MB, peak_mb


def test_index_names_the_file_it_refuses_and_prints_no_nameless_warning(retrieval_tiny_artifacts, big_png, tmp_path):
    """Pillow warns of a decompression bomb above 89 Mpx without naming the file; index refuses
    the 144-Mpx image from its header and lists it by name, with no warning line besides."""
    from tests.conftest import run_cli
    from tests.runtime.index_photos import write_photos

    photos = tmp_path / "photos"
    write_photos(photos, 2)
    shutil.copy(big_png, photos / "big.png")
    proc = run_cli("index", retrieval_tiny_artifacts, photos, "--db", tmp_path / "p.db")
    assert proc.returncode == 0, proc.stderr
    assert "DecompressionBomb" not in proc.stderr and "warning" not in proc.stderr.lower(), proc.stderr
    assert f"{photos / 'big.png'}: refused, 12000x12000" in proc.stdout
