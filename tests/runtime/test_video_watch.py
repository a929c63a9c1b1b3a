"""Watching video files: toy-scene videos made here with PyAV (H.264 in MP4, MJPEG in AVI) whose
scene changes are known; the toy model captions them; the toy retrieval model raises alerts."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("av")

from runtime.cli.main import main  # noqa: E402
from runtime.pipeline import Blip2Pipeline  # noqa: E402
from runtime.retriever import Blip2Retriever  # noqa: E402
from runtime.video import AlertRule, FileSource, watch_retriever  # noqa: E402
from runtime.video.synthetic_video import write_video  # noqa: E402
from tests.runtime.video_support import ALERT_SHOTS, CHANGES, FPS, SCENES, SHOTS, SUBTLE, SUBTLE_CHANGES, TARGET  # noqa: E402

# Scene-change sampling may keep at most this many frames that are not at a change (the first
# frame is always kept and not counted).
MAX_EXTRA_SCENE_FRAMES = 1


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for codec, name in (("h264", "scenes.mp4"), ("mjpeg", "scenes.avi")):
        assert write_video(root / name, SHOTS, fps=FPS, codec=codec) == CHANGES
        out[codec] = root / name
    assert write_video(root / "subtle.mp4", SUBTLE, fps=FPS) == SUBTLE_CHANGES
    out["subtle"] = root / "subtle.mp4"
    write_video(root / "alert.mp4", ALERT_SHOTS, fps=FPS)
    out["alert"] = root / "alert.mp4"
    return out


@pytest.fixture(scope="module")
def pipe(toy_artifacts):
    return Blip2Pipeline.from_artifacts(toy_artifacts)


def _frames(path) -> dict[int, np.ndarray]:
    """Every frame of a video, decoded on its own (not through watch), by index."""
    with FileSource(path) as src:
        return {f.index: f.image.copy() for f in src.frames()}


@pytest.mark.parametrize("codec", ["h264", "mjpeg"])
def test_scene_captions_are_the_pipelines_captions_of_those_frames(pipe, videos, codec):
    events = list(pipe.watch(videos[codec], every=None, scene=True))
    captions = [e for e in events if e.kind == "caption"]
    assert [e.timestamp for e in captions] == [0.0, *CHANGES]
    assert [e.frame for e in captions] == [int(t * FPS) for t in [0.0, *CHANGES]]
    frames = _frames(videos[codec])
    for e in captions:
        assert e.text == pipe.caption([frames[e.frame]])[0].text
    # and the toy model reads the compressed frames right
    assert [e.text for e in captions] == [s.caption for s in SCENES]
    end = events[-1]
    assert end.kind == "end" and end.counts["decoded"] == 80 and end.counts["described"] == 4
    assert end.timestamp == pytest.approx(8.0)


@pytest.mark.parametrize("name, changes", [("h264", CHANGES), ("subtle", SUBTLE_CHANGES)])
def test_scene_sampling_finds_every_change_and_few_extra_frames(pipe, videos, name, changes):
    kept = [e.timestamp for e in pipe.watch(videos[name], every=None, scene=True, max_new_tokens=1)
            if e.kind == "caption"]
    assert kept[0] == 0.0
    for t in changes:
        assert any(abs(k - t) < 0.5 / FPS for k in kept), (t, kept)
    assert len(kept) - 1 - len(changes) <= MAX_EXTRA_SCENE_FRAMES, kept


def test_time_sampling_skips_near_duplicates_unless_asked(pipe, videos):
    events = list(pipe.watch(videos["h264"], every=0.5, max_new_tokens=1))
    described = [e.timestamp for e in events if e.kind == "caption"]
    assert described == [0.0, *CHANGES]  # a still scene is described once
    assert events[-1].counts["duplicates"] == 12  # 3 more due per 2 s shot
    kept = [e.timestamp for e in pipe.watch(videos["h264"], every=0.5, skip_duplicates=False, max_new_tokens=1)
            if e.kind == "caption"]
    assert kept == pytest.approx([i * 0.5 for i in range(16)])


def test_several_questions_run_the_vision_stage_once_per_frame(pipe, videos, monkeypatch):
    runner = pipe.runners["vision"]
    calls = []
    real = runner.infer
    monkeypatch.setattr(runner, "infer", lambda feeds: calls.append(len(next(iter(feeds.values())))) or real(feeds))
    questions = ["what colour is it?", "where is it?", "what size is it?"]
    events = [e for e in pipe.watch(videos["mjpeg"], every=None, scene=True, questions=questions)
              if e.kind == "answer"]
    assert calls == [1, 1, 1, 1]  # four frames, one image each
    monkeypatch.setattr(runner, "infer", real)
    frames = _frames(videos["mjpeg"])
    assert len(events) == 12
    for e in events:
        assert e.text == pipe.ask([frames[e.frame]], e.question)[0].text
    by_scene = [[e.text for e in events if e.frame == i * 20] for i in range(4)]
    assert by_scene == [[s.colour, s.position, s.size] for s in SCENES]


def test_closing_the_generator_early_is_clean(pipe, videos):
    watch = pipe.watch(videos["h264"], every=0.5, skip_duplicates=False, max_new_tokens=1)
    first = next(watch)
    watch.close()
    assert first.kind == "caption" and first.timestamp == 0.0


def test_an_alert_for_a_scene_on_screen_for_three_seconds_fires_once(retrieval_toy_artifacts, videos):
    retriever = Blip2Retriever.from_artifacts(retrieval_toy_artifacts)
    rules = [AlertRule(TARGET.caption, threshold=0.7, min_duration=0.5),
             AlertRule("a small purple dotted square at the top", threshold=0.7, min_duration=0.5)]
    events = list(watch_retriever(retriever, videos["alert"], rules, every=0.25))
    alerts = [e for e in events if e.kind in ("alert", "clear")]
    assert [(e.kind, e.query) for e in alerts] == [("alert", TARGET.caption), ("clear", TARGET.caption)]
    start, clear = alerts
    # fired once the scene had been there min_duration; start and end where the scene is
    assert start.start == pytest.approx(2.0) and start.timestamp == pytest.approx(2.5)
    assert clear.start == pytest.approx(2.0) and clear.end == pytest.approx(5.0)
    scores = [e.scores[TARGET.caption] for e in events if e.kind == "score"]
    assert len(scores) == 28 and clear.peak == pytest.approx(max(scores), abs=1e-6)


def test_itm_confirmation_keeps_an_alert_to_the_frames_that_really_match(retrieval_toy_artifacts, videos):
    retriever = Blip2Retriever.from_artifacts(retrieval_toy_artifacts)
    loose = AlertRule(TARGET.caption, threshold=-0.6)  # under every scene's ITC score for this text (-0.49 and up)
    events = [e for e in watch_retriever(retriever, videos["alert"], [loose], every=0.5) if e.kind in ("alert", "clear")]
    assert [(e.kind, e.start, e.end) for e in events] == [("alert", 0.0, None), ("clear", 0.0, 7.0)]
    confirmed = AlertRule(TARGET.caption, threshold=-0.6, confirm_itm=0.5)
    events = [e for e in watch_retriever(retriever, videos["alert"], [confirmed], every=0.5)
              if e.kind in ("alert", "clear")]
    assert [(e.kind, e.start, e.end) for e in events] == [("alert", 2.0, None), ("clear", 2.0, 5.0)]
    assert events[0].itm > 0.5


def test_cli_writes_json_lines_and_subtitles(toy_artifacts, videos, tmp_path, capsys):
    srt, vtt = tmp_path / "c.srt", tmp_path / "c.vtt"
    status = main(["watch", str(toy_artifacts), str(videos["h264"]), "--scene", "--json", "--srt", str(srt),
                   "--vtt", str(vtt)])
    out = capsys.readouterr()
    assert status == 0, out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [(d["event"], d["timestamp"]) for d in lines] == [("caption", t) for t in (0.0, 2.0, 4.0, 6.0)] + [("end", 8.0)]
    assert [d["text"] for d in lines[:4]] == [s.caption for s in SCENES]
    assert srt.read_text() == "".join(
        f"{i + 1}\n00:00:0{2 * i},000 --> 00:00:0{2 * i + 2},000\n{s.caption}\n\n" for i, s in enumerate(SCENES))
    assert vtt.read_text().startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.000\n" + SCENES[0].caption + "\n\n")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_cli_alert_lines(retrieval_toy_artifacts, videos, capsys):
    status = main(["watch", str(retrieval_toy_artifacts), str(videos["alert"]), "--alert", TARGET.caption,
                   "--threshold", "0.7", "--min-duration", "500ms", "--every", "250ms", "--json"])
    out = capsys.readouterr()
    assert status == 0, out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [(d["event"], d.get("start"), d.get("end")) for d in lines] == [
        ("alert", 2.0, None), ("clear", 2.0, 5.0), ("end", None, None)]


def test_cli_bad_sources_are_one_line_each_and_the_others_go_on(toy_artifacts, videos, tmp_path, capsys):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    empty = tmp_path / "empty.mp4"
    empty.touch()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(videos["h264"].read_bytes()[:4000])  # its index (moov) is at the end: gone
    fast = tmp_path / "fast.mp4"
    write_video(fast, SHOTS, fps=FPS, faststart=True)
    fast_cut = tmp_path / "fast-cut.mp4"
    fast_cut.write_bytes(fast.read_bytes()[:int(fast.stat().st_size * 0.6)])  # plays, then ends early
    status = main(["watch", str(toy_artifacts), str(text), str(empty), str(cut), str(fast_cut), str(videos["h264"]),
                   "--scene", "--json"])
    out = capsys.readouterr()
    assert status == 2
    errors = out.err.strip().splitlines()
    assert "Traceback" not in out.err and len(errors) == 4, out.err
    assert errors[0] == f"error: {text}: not a video, or a damaged or truncated one (FFmpeg: invalid data)"
    assert errors[1] == f"error: {empty}: empty file (0 bytes), not a video"
    assert errors[2].startswith(f"error: {cut}: not a video, or a damaged")
    assert errors[3].startswith(f"error: {fast_cut}: truncated: its frames end at ")
    done = [json.loads(line) for line in out.out.splitlines()]
    assert [d["text"] for d in done if d["source"] == str(videos["h264"]) and d["event"] == "caption"] == \
        [s.caption for s in SCENES]


def test_cli_refuses_an_absurd_resolution_before_decoding(toy_artifacts, videos, capsys):
    status = main(["watch", str(toy_artifacts), str(videos["h264"]), "--max-image-pixels", "10000"])
    err = capsys.readouterr().err
    assert status == 2
    assert err == f"error: {videos['h264']}: resolution 256x256 is over the limit of 10000 pixels (--max-image-pixels)\n"
