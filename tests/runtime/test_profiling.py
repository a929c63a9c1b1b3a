"""`blip2-edge profile`: statistics on known values, outputs consistent with the raw runs they
summarise, forced lengths, output paths checked before any run, bad arguments."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from runtime import synthetic
from runtime.cli.outputs import check_output_file
from runtime.errors import Blip2EdgeError
from runtime.profiling.profiler import STAGES, ProfileOptions, profile_artifacts
from runtime.profiling.stats import duration_stats
from runtime.profiling.tegrastats import parse_line, tegrastats_summary
from tests.conftest import REPO, run_cli
from tests.exporter.test_export_errors import assert_one_line_error


def test_duration_stats_on_known_values():
    s = duration_stats([0.004, 0.001, 0.003, 0.002])
    assert s["n"] == 4 and (s["min"], s["max"]) == (0.001, 0.004)
    assert s["mean"] == pytest.approx(0.0025) and s["p50"] == pytest.approx(0.0025)
    assert s["p90"] == pytest.approx(0.0037) and s["p99"] == pytest.approx(0.00397)  # linear interpolation
    # 101 values: the p-th percentile is exactly the p-th smallest; a generator is accepted.
    v = np.random.default_rng(0).exponential(size=101)
    s = duration_stats(x for x in v)
    ordered = np.sort(v)
    assert (s["p50"], s["p90"], s["p99"]) == (ordered[50], ordered[90], ordered[99])
    assert s["mean"] == pytest.approx(v.sum() / 101) and s["n"] == 101
    assert duration_stats([]) == {"mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None,
                                  "n": 0}


def test_profile_is_consistent_with_its_raw_runs(toy_artifacts):
    images = [im for _, im in synthetic.make_scenes(3, seed=1)]
    prof = profile_artifacts(toy_artifacts, images, ProfileOptions(runs=3, warmup=1, new_tokens=6, batch_size=2))
    runs = prof["runs"]
    assert len(runs) == 3  # the warm-up run is not measured
    prefill = STAGES.index("prefill") + 1
    for run in runs:
        assert len(run["decode_steps"]) == 5  # forced length: 6 tokens, the first from prefill
        assert all(run[s] >= 0 for s in STAGES) and run["vision"] > 0 and run["decode"] > 0
        assert sum(run[s] for s in STAGES) <= run["total"]  # one clock: the stages lie inside the total
        assert sum(run["decode_steps"]) <= run["decode"]
    for stage in STAGES:
        assert prof["stages"][stage] == duration_stats(r[stage] for r in runs)
    assert prof["stages"]["end_to_end"] == duration_stats(r["total"] for r in runs)
    assert prof["stages"]["decode_step"] == duration_stats(t for r in runs for t in r["decode_steps"])
    assert prof["time_to_first_token"] == duration_stats(sum(r[s] for s in STAGES[:prefill]) for r in runs)
    assert prof["tokens_per_s"] / prof["images_per_s"] == pytest.approx(6)  # tokens per image
    assert prof["precision"] == {"vision": "fp32", "qformer": "fp32", "decoder": "fp32"}
    assert prof["kv_cache"] == "shared"  # the fp32 export's default


def test_outputs_match_the_json(toy_artifacts, tmp_path):
    files = {k: tmp_path / f"p.{k}" for k in ("json", "csv")}
    trace, png = tmp_path / "trace.json", tmp_path / "p.png"
    proc = run_cli("profile", toy_artifacts, toy_artifacts, "--synthetic", "3", "--runs", "3", "--warmup", "1",
                   "--new-tokens", "5", "--json", files["json"], "--csv", files["csv"], "--trace", trace, "--plot", png,
                   "--backend", "onnxruntime")  # (the default is auto: tests/runtime/test_auto_backend.py)
    assert proc.returncode == 0, proc.stderr
    for stage in (*STAGES, "decode_step", "end_to_end", "tokens/s", "speedup vs 1st"):
        assert stage in proc.stdout
    assert any(line.split() == ["KV", "cache", "shared", "shared"] for line in proc.stdout.splitlines())

    data = json.loads(files["json"].read_text())
    env = data["environment"]
    assert env["cores"] == os.cpu_count() and "CPUExecutionProvider" in env["providers"]
    assert env["onnxruntime_threads"] == {"spin": "auto", "intra_op_threads": 0,  # the default settings
                                          "allow_spinning": {"vision": False, "qformer": False, "decoder": True},
                                          "stop_spinning_after_run": {"vision": False, "qformer": False,
                                                                      "decoder": True},
                                          "tf32": True, "openvino_pinning": None}
    assert data["settings"] == {"batch_size": 1, "new_tokens": 5, "runs": 3, "warmup": 1, "prompt": None,
                                "device": "cpu", "backend": "onnxruntime", "precision": "f32", "backends": None}
    placement = data["profiles"][0]["placement"]  # which engine ran each stage
    assert {stage: p["engine"] for stage, p in placement.items()} == dict.fromkeys(
        ("vision", "qformer", "decoder"), "onnxruntime")
    assert "placement: vision: onnxruntime CPUExecutionProvider" in proc.stdout
    assert len(data["profiles"]) == 2
    p = data["profiles"][0]
    assert len(p["runs"]) == 3 and p["stages"]["decode_step"]["n"] == 3 * 4
    assert p["stages"]["end_to_end"] == duration_stats(r["total"] for r in p["runs"])

    # CSV: one row per (directory, stage), the JSON's statistics in milliseconds.
    rows = list(csv.DictReader(files["csv"].open()))
    assert len(rows) == sum(len(q["stages"]) for q in data["profiles"])
    assert all(r["env_onnxruntime"] == env["onnxruntime"] for r in rows)
    first = {r["stage"]: r for r in rows[: len(p["stages"])]}
    for stage, s in p["stages"].items():
        assert int(first[stage]["n"]) == s["n"]
        for k in ("mean", "p50", "p90", "p99", "min", "max"):
            assert float(first[stage][f"{k}_ms"]) == pytest.approx(s[k] * 1e3, abs=1e-4)

    # Trace: the first measured run, stages back to back with its durations, then its decode steps.
    events = json.loads(trace.read_text())["traceEvents"]
    stage_events = [e for e in events if e.get("cat") == "stage"]
    run = p["runs"][0]
    assert [e["name"] for e in stage_events] == list(STAGES)
    assert [e["dur"] for e in stage_events] == pytest.approx([run[s] * 1e6 for s in STAGES])
    assert stage_events[0]["ts"] == 0
    assert all(b["ts"] == pytest.approx(a["ts"] + a["dur"]) for a, b in zip(stage_events, stage_events[1:]))
    steps = [e for e in events if e.get("cat") == "decode_step"]
    assert [e["dur"] for e in steps] == pytest.approx([t * 1e6 for t in run["decode_steps"]])
    decode = stage_events[STAGES.index("decode")]
    assert steps[0]["ts"] == decode["ts"] and steps[-1]["ts"] + steps[-1]["dur"] <= decode["ts"] + decode["dur"] + 1e-3

    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200


@pytest.mark.parametrize("flag", ["--json", "--csv", "--trace", "--plot"])
def test_output_paths_are_checked_before_any_run(toy_artifacts, tmp_path, flag):
    missing = tmp_path / "missing" / "out.file"
    proc = run_cli("profile", toy_artifacts, "--synthetic", "1", "--runs", "1", "--warmup", "0", flag, missing)
    assert_one_line_error(proc, flag, "does not exist")
    assert proc.stdout == ""  # no table: it failed before profiling, not after


def test_check_output_file(tmp_path):
    check_output_file("--json", tmp_path / "new.json")  # a new file in a writable directory
    (tmp_path / "old.json").write_text("{}")
    check_output_file("--json", tmp_path / "old.json")  # replaced
    with pytest.raises(Blip2EdgeError, match="--csv .*: exists and is not a regular file"):
        check_output_file("--csv", tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(Blip2EdgeError, match="--trace .*fifo: exists and is not a regular file"):
        check_output_file("--trace", tmp_path / "fifo")


def test_bad_arguments(toy_artifacts, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("profile", toy_artifacts, "--images", tmp_path / "empty"), "no readable images")
    assert_one_line_error(run_cli("profile", toy_artifacts, "--runs", "0"), "--runs must be >= 1")
    assert_one_line_error(run_cli("profile", toy_artifacts, "--device", "tpu"), "unknown device 'tpu'")
    assert_one_line_error(run_cli("profile", tmp_path / "nope"), "not an artifact directory")


# Recorded tegrastats lines: Nano on JetPack 4.6, AGX Orin on JetPack 5.1, Orin Nano on JetPack 6.0.
JETPACK4 = ("RAM 1681/3956MB (lfb 34x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
            "CPU [12%@1479,5%@1479,2%@1479,1%@1479] EMC_FREQ 3%@1600 GR3D_FREQ 37%@921 APE 25 PLL@23C "
            "CPU@26C PMIC@100C GPU@24.5C AO@33C thermal@25.25C POM_5V_IN 3245/3120 POM_5V_GPU 410/400 "
            "POM_5V_CPU 820/801")
JETPACK5 = ("RAM 2475/30536MB (lfb 6735x4MB) SWAP 0/15268MB (cached 0MB) CPU [1%@729,0%@729,0%@729,0%@729,"
            "off,off,off,off,off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 61%@[305,305] VIC_FREQ 729 APE 174 "
            "CV0@-256C CPU@45.25C Tboard@33C SOC2@41.593C Tdiode@35C SOC0@42.281C CV1@-256C GPU@40.718C "
            "tj@45.25C SOC1@41.125C CV2@-256C VDD_GPU_SOC 1992mW/1992mW VDD_CPU_CV 398mW/398mW "
            "VIN_SYS_5V0 2321mW/2321mW")
JETPACK6 = ("11-27-2026 10:00:00 RAM 3059/7620MB (lfb 3x4MB) SWAP 0/3810MB (cached 0MB) "
            "CPU [2%@729,1%@729,0%@729,0%@729,0%@729,0%@729] GR3D_FREQ 0% cpu@47.5C soc2@46.5C soc0@46.25C "
            "gpu@47.093C tj@47.5C soc1@46.75C VDD_IN 4755mW/4755mW VDD_CPU_GPU_CV 518mW/518mW "
            "VDD_SOC 1514mW/1514mW")


def test_tegrastats_parser_on_three_jetpacks():
    four, five, six = parse_line(JETPACK4), parse_line(JETPACK5), parse_line(JETPACK6)
    assert (four["ram_used_mb"], four["ram_total_mb"], four["gpu_load_pct"]) == (1681, 3956, 37)
    assert four["power_mw"] == 3245 and four["rails"]["POM_5V_GPU"] == 410
    assert (five["ram_used_mb"], five["gpu_load_pct"]) == (2475, 61)
    assert five["power_mw"] == 1992 + 398 + 2321  # AGX Orin: the module total is the sum of its rails
    assert (six["ram_used_mb"], six["ram_total_mb"], six["gpu_load_pct"], six["power_mw"]) == (3059, 7620, 0, 4755)
    s = tegrastats_summary([four, six])
    assert s["samples"] == 2 and s["power_mw"]["max"] == 4755 and s["ram_used_mb"]["mean"] == (1681 + 3059) / 2
    assert parse_line("garbage") == {}


def test_t5_encoder_is_its_own_stage_everywhere(t5_tiny_artifacts, toy_artifacts, tmp_path):
    """Side by side with an OPT directory: the encoder row is T5's (OPT shows '-'), and it is in
    the JSON, the CSV and the trace, between prompt and prefill."""
    files = {k: tmp_path / f"p.{k}" for k in ("json", "csv")}
    trace = tmp_path / "trace.json"
    proc = run_cli("profile", t5_tiny_artifacts, toy_artifacts, "--synthetic", "2", "--runs", "2", "--warmup", "0",
                   "--new-tokens", "3", "--json", files["json"], "--csv", files["csv"], "--trace", trace)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.strip()}
    assert rows["encoder"][1] == "-" and float(rows["encoder"][0]) > 0
    order = list(rows)
    assert order.index("prompt") < order.index("encoder") < order.index("prefill")

    t5 = json.loads(files["json"].read_text())["profiles"][0]
    assert t5["llm_family"] == "t5" and t5["stage_order"][5:7] == ["encoder", "prefill"]
    assert set(t5["precision"]) == {"vision", "qformer", "encoder", "cross_kv", "decoder"}
    assert t5["stages"]["encoder"]["n"] == 2
    assert {r["stage"] for r in csv.DictReader(files["csv"].open()) if "t5" in r["artifacts"]} >= {"encoder"}
    names = [e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "stage"]
    assert names == t5["stage_order"]


def test_reference_runs_transformers_in_a_process_of_its_own(tiny_artifacts, tiny_checkpoint, tmp_path):
    """`--reference` times transformers' generate on the same batches; the profiling process
    itself never imports torch or the exporter (the reference runs in a child process)."""
    out = tmp_path / "p.json"
    code = ("import sys; from runtime.cli.main import main; rc = main(sys.argv[1:]); "
            "assert not {'torch', 'transformers', 'exporter'} & set(sys.modules), sorted(sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "profile", str(tiny_artifacts), "--synthetic", "2", "--runs",
                           "2", "--warmup", "1", "--new-tokens", "3", "--reference", str(tiny_checkpoint),
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    reference = json.loads(out.read_text())["reference"]
    assert reference["mode"] == "eager" and reference["model"] == str(tiny_checkpoint)
    assert reference["end_to_end"]["n"] == 2  # the runs after warm-up, as for the artifacts
    assert "reference: transformers eager generate" in proc.stdout


def test_reference_failure_is_one_line(tiny_artifacts, tmp_path):
    proc = run_cli("profile", tiny_artifacts, "--synthetic", "1", "--runs", "1", "--warmup", "0",
                   "--new-tokens", "2", "--reference", tmp_path / "missing")
    assert_one_line_error(proc, "--reference")
