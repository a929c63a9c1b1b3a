"""ONNX Runtime thread settings per stage: what each session is given, that they change no
output, and how the CLI and the profiler take and record them."""

from __future__ import annotations

import json

import pytest

from runtime.backends.onnxrt import ThreadSettings
from runtime.errors import OptionError
from runtime.pipeline import Blip2Pipeline
from tests.conftest import run_cli
from tests.exporter.test_export_errors import assert_one_line_error
from tests.runtime.test_cli import write_scenes

SPIN_KEY = "session.intra_op.allow_spinning"
STAGES = ("vision", "qformer", "encoder", "cross_kv", "decoder")


@pytest.mark.parametrize("settings, spinning", [
    (ThreadSettings(), {"decoder"}),  # the default: only the stage that runs every step
    (ThreadSettings(spin="on"), set(STAGES)),
    (ThreadSettings(spin="off"), set()),
    (ThreadSettings(spin="auto", stage_spin=(("qformer", True), ("decoder", False))), {"qformer"}),
])
def test_which_stages_spin(settings, spinning):
    assert {s for s in STAGES if settings.allow_spinning(s)} == spinning
    assert settings.describe(STAGES)["allow_spinning"] == {s: s in spinning for s in STAGES}


@pytest.mark.parametrize("kw", [{"spin": "sometimes"}, {"intra_op_threads": -1}, {"intra_op_threads": 1.5},
                                {"intra_op_threads": True}, {"stage_spin": (("decoder", "yes"),)},
                                {"stage_spin": ("decoder",)}, {"tf32": "no"}, {"tf32": 0}, {"linger": "yes"}])
def test_bad_settings_are_option_errors(kw):
    with pytest.raises(OptionError):
        ThreadSettings(**kw)


def test_a_stage_override_must_name_a_stage_of_the_model(toy_artifacts):
    with pytest.raises(OptionError, match="stage_spin names no stage of this model: qfromer; stages: vision, qformer, "
                                          "decoder"):
        Blip2Pipeline.from_artifacts(toy_artifacts, threads=ThreadSettings(stage_spin=(("qfromer", True),)))


def _session_settings(pipe) -> dict:
    out = {}
    for stage, runner in pipe.runners.items():
        so = runner.session.get_session_options()
        out[stage] = (so.get_session_config_entry(SPIN_KEY), so.intra_op_num_threads)
    return out


def test_sessions_get_their_stage_settings_and_outputs_do_not_change(toy_artifacts):
    from runtime import synthetic

    images = [im for _, im in synthetic.make_scenes(2, seed=5)]
    default = Blip2Pipeline.from_artifacts(toy_artifacts)
    assert _session_settings(default) == {"vision": ("0", 0), "qformer": ("0", 0), "decoder": ("1", 0)}
    off = Blip2Pipeline.from_artifacts(toy_artifacts, threads=ThreadSettings(spin="off", intra_op_threads=1))
    assert _session_settings(off) == {"vision": ("0", 1), "qformer": ("0", 1), "decoder": ("0", 1)}
    gen = dict(max_new_tokens=8, num_beams=2)
    assert [r.tokens for r in off.caption(images, **gen)] == [r.tokens for r in default.caption(images, **gen)]


def test_cli_spin_flags(toy_artifacts, tmp_path):
    write_scenes(tmp_path, 1)
    proc = run_cli("caption", toy_artifacts, tmp_path, "--spin", "off", "--intra-op-threads", "1",
                   "--max-new-tokens", "4")
    assert proc.returncode == 0 and proc.stdout.count(": ") == 1, proc.stderr
    assert_one_line_error(run_cli("ask", toy_artifacts, tmp_path, "-q", "what?", "--intra-op-threads", "-1"),
                          "--intra-op-threads must be >= 0")
    proc = run_cli("caption", toy_artifacts, tmp_path, "--spin", "always")
    assert proc.returncode == 2 and "--spin" in proc.stderr and "auto" in proc.stderr


def test_profile_records_the_thread_settings(toy_artifacts, tmp_path):
    out = tmp_path / "p.json"
    proc = run_cli("profile", toy_artifacts, "--synthetic", "1", "--runs", "1", "--warmup", "0", "--new-tokens", "2",
                   "--spin", "on", "--intra-op-threads", "2", "--no-tf32", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["environment"]["onnxruntime_threads"] == {
        "spin": "on", "intra_op_threads": 2, "allow_spinning": {"vision": True, "qformer": True, "decoder": True},
        "stop_spinning_after_run": {"vision": False, "qformer": False, "decoder": False}, "tf32": False,
        "openvino_pinning": None}


STOP_KEY = "session.force_spinning_stop"


def _config_entry(session, key: str) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(key)
    except Exception:  # noqa: BLE001  (ONNX Runtime raises for a key never set)
        return None


@pytest.mark.parametrize("settings, stops", [
    (ThreadSettings(), {"decoder": "1"}),  # the policy: the decoder spins during a step, not after it
    (ThreadSettings(linger=True), {}),  # ONNX Runtime's own: its threads keep spinning after the step
    (ThreadSettings(spin="on"), {}),
    (ThreadSettings(spin="off"), {}),  # nothing spins, nothing to stop
])
def test_spinning_threads_stop_when_their_run_returns(toy_artifacts, settings, stops):
    pipe = Blip2Pipeline.from_artifacts(toy_artifacts, threads=settings)
    assert {s: v for s, r in pipe.runners.items() if (v := _config_entry(r.session, STOP_KEY))} == stops
    assert settings.describe(pipe.stage_names)["stop_spinning_after_run"] == {s: s in stops for s in pipe.stage_names}
