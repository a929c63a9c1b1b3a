"""Bad inputs to `blip2-edge quantize` and to the calibration image loader."""

from __future__ import annotations

import pytest
from PIL import Image

from calibration.quantize import QuantizeOptions, quantize
from calibration.sources import folder_source
from runtime.errors import Blip2EdgeError
from tests.conftest import run_cli
from tests.exporter.test_export_errors import assert_one_line_error


def test_already_quantized_is_refused(toy_artifacts, tmp_path):
    quantize(toy_artifacts, tmp_path / "q", QuantizeOptions(num_calib=8, held_out=20, gate=False), log=lambda s: None)
    assert_one_line_error(run_cli("quantize", tmp_path / "q", tmp_path / "qq", "--synthetic", "8"), "already quantized")


def test_out_dir_exists(toy_artifacts, tmp_path):
    (tmp_path / "q").mkdir()
    assert_one_line_error(run_cli("quantize", toy_artifacts, tmp_path / "q", "--synthetic", "8"), "already exists")


def test_empty_folder(toy_artifacts, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("no images here")
    assert_one_line_error(run_cli("quantize", toy_artifacts, tmp_path / "q", "--images", tmp_path / "imgs"),
                          "no images")


def test_too_few_images(toy_artifacts, tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    assert_one_line_error(run_cli("quantize", toy_artifacts, tmp_path / "q", "--images", tmp_path / "imgs",
                                  "--num-calib", "10"), "5 readable images", "--num-calib 10")


def test_bad_method_and_missing_artifacts(toy_artifacts, tmp_path):
    proc = run_cli("quantize", toy_artifacts, tmp_path / "q", "--method", "magic")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert_one_line_error(run_cli("quantize", tmp_path / "nope", tmp_path / "q"), "not an artifact directory")


def test_folder_loader_is_recursive_deterministic_and_skips_unreadable(tmp_path):
    for sub in ("a", "b/c"):
        (tmp_path / sub).mkdir(parents=True)
    for i in range(20):
        name = f"{i}.{'png' if i % 3 else 'bmp'}"
        Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(tmp_path / ("a" if i % 2 else "b/c") / name)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "a" / "empty.webp").write_bytes(b"")
    one = folder_source(tmp_path, 10, seed=3, held_out=20)
    two = folder_source(tmp_path, 10, seed=3, held_out=20)
    other = folder_source(tmp_path, 10, seed=4, held_out=20)
    assert one.calibration == two.calibration and one.calibration != other.calibration
    assert len(one.calibration) == 10 and len(one.held_out) == 10
    assert not set(one.calibration) & set(one.held_out)
    assert one.skipped == 2 and one.describe()["skipped_unreadable"] == 2
    with pytest.raises(Blip2EdgeError, match="need --num-calib 19"):
        folder_source(tmp_path, 19, seed=0)


@pytest.mark.parametrize("value", ["89.9", "100.5", "nan"])
def test_percentile_out_of_range(toy_artifacts, tmp_path, value):
    assert_one_line_error(run_cli("quantize", toy_artifacts, tmp_path / "q", "--method", "percentile",
                                  "--percentile", value), "--percentile must be in [90, 100]")
    assert not (tmp_path / "q").exists()


def test_percentile_checked_when_options_are_made():
    from calibration.visual import VisualOptions

    for bad in (50.0, 100.001, float("nan")):
        with pytest.raises(Blip2EdgeError, match="--percentile must be in"):
            VisualOptions(method="percentile", percentile=bad)
    assert VisualOptions(method="percentile", percentile=99.9).percentile == 99.9


@pytest.mark.parametrize("content", ["{\"vision\": {\"graph_sha256\": ", "[1, 2]", "{\"vision\": {\"ranges\": 3}}",
                                     "\udcff"])
def test_corrupt_calibration_cache_is_one_line_naming_it(toy_artifacts, tmp_path, content):
    cache = tmp_path / "ranges.json"
    cache.write_bytes(content.encode("utf-8", "surrogateescape"))
    proc = run_cli("quantize", toy_artifacts, tmp_path / "q", "--synthetic", "8", "--held-out", "8",
                   "--calibration-cache", cache)
    assert_one_line_error(proc, str(cache), "calibration cache", "delete it")
    assert not (tmp_path / "q").exists() and cache.read_bytes() == content.encode("utf-8", "surrogateescape")


def test_calibration_cache_that_is_a_fifo_does_not_hang(tmp_path):
    import os

    from calibration.visual import RangeCache

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(Blip2EdgeError, match="fifo: calibration cache is not a regular file"):
        RangeCache(tmp_path / "fifo", {})


def test_calibration_cache_is_replaced_whole(tmp_path):
    """Written to a temporary file and renamed: a reader (here a hard link to the old file)
    never sees a half-written cache, and no temporary file is left."""
    import json
    import os

    from calibration.visual import RangeCache, VisualOptions

    path = tmp_path / "cache" / "ranges.json"
    ranges = tmp_path / "r.json"
    ranges.write_text(json.dumps({"t": [0.0, 1.0]}))
    cache = RangeCache(path, {"source": "synthetic"})
    cache.store("vision", "sha", VisualOptions(), ranges)
    os.link(path, tmp_path / "reader.json")
    before = (tmp_path / "reader.json").read_text()
    cache.store("qformer", "sha", VisualOptions(), ranges)
    assert (tmp_path / "reader.json").read_text() == before  # the old file was not rewritten in place
    assert set(json.loads(path.read_text())) == {"vision", "qformer"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["ranges.json"]
    again = RangeCache(path, {"source": "synthetic"})
    assert again.extract("vision", "sha", VisualOptions(), tmp_path / "x.json").exists()
    other = RangeCache(path, {"source": "folder"})
    assert not other.extract("vision", "sha", VisualOptions(), tmp_path / "y.json").exists()


def test_folder_identity_follows_the_chosen_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    one = folder_source(folder, 10, seed=3, held_out=8)
    assert one.calibration_identity() == folder_source(folder, 10, seed=3, held_out=10).calibration_identity()
    assert one.calibration_identity() != folder_source(folder, 10, seed=4, held_out=8).calibration_identity()
    assert one.describe()["selection_sha256"] == one.calibration_identity()["selection_sha256"]
    Image.new("RGB", (9, 9), (255, 0, 0)).save(one.calibration[0])  # a chosen image changed
    assert folder_source(folder, 10, seed=3, held_out=8).calibration_identity() != one.calibration_identity()


def test_failed_gate_report_never_replaces_a_users_file(tiny_artifacts, tmp_path):
    """The report of a run below its gates goes beside OUT_DIR: a user's file or link of that
    name is left alone (the next free name is used, and named in the error); our own earlier
    report is replaced whole."""
    import json
    import os

    from calibration.gates import GateError, Gates

    (tmp_path / "q.fidelity.json").write_text("my notes")
    (tmp_path / "secret.txt").write_text("keep me")
    os.symlink(tmp_path / "secret.txt", tmp_path / "q.fidelity-1.json")
    must_fail = QuantizeOptions(num_calib=4, held_out=4, gates=Gates(visual_cosine_mean=1.5))
    for _ in range(2):  # the second run finds its own earlier report at q.fidelity-2.json
        with pytest.raises(GateError) as err:
            quantize(tiny_artifacts, tmp_path / "q", must_fail, log=lambda s: None)
        assert f"report: {tmp_path / 'q.fidelity-2.json'} (q.fidelity.json is not a report of ours" in str(err.value)
    assert (tmp_path / "q.fidelity.json").read_text() == "my notes"
    assert (tmp_path / "secret.txt").read_text() == "keep me" and (tmp_path / "q.fidelity-1.json").is_symlink()
    kept = json.loads((tmp_path / "q.fidelity-2.json").read_text())
    assert [g["passed"] for g in kept["gates"] if g["name"] == "vision cosine mean"] == [False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.fidelity-1.json", "q.fidelity-2.json",
                                                          "q.fidelity.json", "secret.txt"]


def test_kept_report_skips_what_is_not_ours_and_never_blocks(tmp_path):
    import json
    import os

    from calibration.kept_report import keep_report

    report = {"held_out_images": 1, "stages": {}, "end_to_end": {}, "gates": []}
    out = tmp_path / "q"
    os.mkfifo(tmp_path / "q.fidelity.json")  # opening it to read would block: it must not be opened
    (tmp_path / "q.fidelity-1.json").mkdir()
    (tmp_path / "q.fidelity-2.json").write_text(json.dumps({"stages": {}, "gates": []}))  # not all our keys
    path, note = keep_report(out, report)
    assert path == tmp_path / "q.fidelity-3.json" and json.loads(path.read_text()) == report
    assert note.startswith(f"report: {path} (q.fidelity.json is not a report of ours")
    assert json.loads((tmp_path / "q.fidelity-2.json").read_text()) == {"stages": {}, "gates": []}
    assert keep_report(out, {**report, "held_out_images": 2})[0] == path  # ours: replaced
    assert json.loads(path.read_text())["held_out_images"] == 2
    assert keep_report(tmp_path / "missing" / "q", report) == (
        None, f"report not kept: cannot write in {tmp_path / 'missing'} (No such file or directory)")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.fidelity.")]  # no temporary file left


def test_decoder_without_lm_head_is_an_artifact_error_naming_the_file(tmp_path):
    from onnx import TensorProto, helper

    from calibration.llm import lm_head_node
    from runtime.errors import ArtifactError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "g", [x], [logits]))
    with pytest.raises(ArtifactError, match=f"{tmp_path / 'decoder.onnx'}: decoder graph has no lm_head MatMul"):
        lm_head_node(model, tmp_path / "decoder.onnx")


def test_contradicting_target_and_activations_exit_2_before_any_work(toy_artifacts, tmp_path):
    out = tmp_path / "q"
    assert_one_line_error(run_cli("quantize", toy_artifacts, out, "--synthetic", "8", "--target", "gpu",
                                  "--activations", "uint8"), "--activations uint8 contradicts --target gpu")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gpu_target_refuses_an_fp32_shared_kv_cache_before_any_work(toy_artifacts, tmp_path):
    """The GPU target's LLM runs on ONNX Runtime CUDA, whose GroupQueryAttention is fp16 only:
    refused up front, naming the export that works, with nothing written."""
    out = tmp_path / "q"
    assert_one_line_error(run_cli("quantize", toy_artifacts, out, "--synthetic", "8", "--target", "gpu"),
                          "--kv-cache concat")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_onnx_runtime_without_the_calibration_cache_is_named(monkeypatch):
    """ONNX Runtime 1.21/1.22's quantize_static has no calibration_cache_path: one line naming the
    installed version, before any calibration (the installed 1.32 passes the same check)."""
    import onnxruntime.quantization as q

    from calibration.cli import check_onnxruntime_quantizer
    from runtime.errors import Blip2EdgeError

    check_onnxruntime_quantizer()
    real = q.quantize_static
    monkeypatch.setattr(q, "quantize_static", lambda model_input, model_output, calibration_data_reader: None)
    with pytest.raises(Blip2EdgeError, match=r"takes calibration_cache_path .*pip install -U 'onnxruntime>=1.32'"):
        check_onnxruntime_quantizer()
    monkeypatch.setattr(q, "quantize_static", real)


def test_a_max_memory_too_small_is_refused_before_anything_is_written(toy_artifacts, tmp_path):
    """quantize prints its expected peak (calibration/memory.py) and refuses, in one line and
    writing nothing, a --max-memory it would exceed."""
    proc = run_cli("quantize", toy_artifacts, tmp_path / "new" / "q", "--synthetic", "8", "--llm", "int4",
                   "--max-memory", "50MB")
    assert_one_line_error(proc, "quantize needs about")
    assert "more than --max-memory 50 MB" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # not OUT_DIR, not its parent, no lock


@pytest.mark.parametrize("value, message", [("3", "--max-memory '3': no unit"),
                                            ("3 gigs", "--max-memory '3 gigs': unknown unit 'gigs'")])
def test_max_memory_parse_errors(toy_artifacts, tmp_path, value, message):
    assert_one_line_error(run_cli("quantize", toy_artifacts, tmp_path / "q", "--synthetic", "8", "--max-memory",
                                  value), message)
    assert list(tmp_path.iterdir()) == []


def test_the_estimate_is_printed_first_and_a_budget_that_fits_runs(toy_artifacts, tmp_path):
    lines = []
    quantize(toy_artifacts, tmp_path / "q", QuantizeOptions(num_calib=8, held_out=4, gate=False, max_memory=32 * 10**9),
             log=lines.append)
    assert lines[0].startswith("quantize: expected peak memory ") and \
        lines[0].endswith(("(--max-memory)", "(available memory)")), lines[0]
    assert (tmp_path / "q" / "manifest.json").is_file()


def test_the_estimate_has_a_phase_per_step_of_the_run(tiny_artifacts):
    from calibration.memory import quantize_peak
    from runtime.artifact.manifest import load_manifest

    tiny = quantize_peak(load_manifest(tiny_artifacts), "int4")
    assert tiny["peak"] == max(tiny["phases"].values())
    assert set(tiny["phases"]) == {"reference", "calibrate vision", "calibrate qformer", "quantize decoder",
                                   "fidelity"}
    assert "quantize decoder" not in quantize_peak(load_manifest(tiny_artifacts), "none")["phases"]
    assert tiny["phases"]["reference"] > 0.1e9 + tiny["source"]  # ONNX Runtime holds more than the files
