"""`blip2-edge watch` as a process: SIGTERM and Ctrl-C on a live stream stop it at once with the
lines so far flushed; without PyAV the command names the extra; the base runtime never imports it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytest.importorskip("av")

from tests.runtime.test_video_live import Sender  # noqa: E402


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_watch_with_every_line_flushed(toy_artifacts, sig):
    with Sender() as sender:
        sender.thread.start()
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "watch", str(toy_artifacts), sender.url,
                                 "--every", "200ms", "--keep-duplicates", "--json", "--max-new-tokens", "3"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        lines = []
        deadline = time.monotonic() + 60
        while len(lines) < 3 and time.monotonic() < deadline:  # each line arrives as it is made
            lines.append(proc.stdout.readline())
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err
    events = [json.loads(line) for line in lines + rest.splitlines()]  # every line whole
    assert len(events) >= 3 and all(e["event"] == "caption" for e in events)


def test_without_pyav_watch_names_the_extra(toy_artifacts, tmp_path):
    code = ("import sys; sys.modules['av'] = None\n"
            "from runtime.cli.main import main\n"
            f"sys.exit(main(['watch', {str(toy_artifacts)!r}, {str(tmp_path / 'clip.mp4')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: blip2-edge watch needs the 'av' package: pip install") and \
        proc.stderr.rstrip().endswith("[video]'") and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_the_runtime_imports_no_video_library_until_a_video_is_read():
    code = ("import sys\n"
            "import runtime, runtime.pipeline, runtime.retriever, runtime.index, runtime.index.cli, runtime.video\n"
            "import runtime.video.cli\n"
            "assert 'av' not in sys.modules, 'av imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_without_pyav_index_lists_the_videos_and_indexes_the_photos(retrieval_toy_artifacts, tmp_path):
    from runtime import synthetic
    from runtime.video.synthetic_video import write_video
    from tests.runtime.video_support import SHOTS

    folder = tmp_path / "library"
    folder.mkdir()
    synthetic.make_scenes(1, seed=2)[0][1].save(folder / "photo.png")
    write_video(folder / "clip.mp4", SHOTS[:1])
    code = ("import sys; sys.modules['av'] = None\n"
            "from runtime.cli.main import main\n"
            f"sys.exit(main(['index', {str(retrieval_toy_artifacts)!r}, {str(folder)!r}, '--db', "
            f"{str(tmp_path / 'i.db')!r}, '--json']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["embedded"], report["videos"], report["videos_indexed"]) == (1, 1, 0)
    [(path, reason)] = [(u["path"], u["reason"]) for u in report["unreadable"]]
    assert path == str(folder / "clip.mp4") and "needs the 'av' package" in reason and "[video]" in reason
