"""`blip2-edge profile`: outputs are produced and well-formed; stages add up; bad arguments."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from runtime.profiling.profiler import STAGES, ProfileOptions, profile_artifacts
from runtime.profiling.tegrastats import parse_line, summarize
from runtime import synthetic
from tests.conftest import run_cli
from tests.exporter.test_export_errors import assert_one_line_error


def test_outputs_are_well_formed(toy_artifacts, tmp_path):
    files = {k: tmp_path / f"p.{k}" for k in ("json", "csv")}
    trace, png = tmp_path / "trace.json", tmp_path / "p.png"
    proc = run_cli("profile", toy_artifacts, toy_artifacts, "--synthetic", "3", "--runs", "3", "--warmup", "1",
                   "--new-tokens", "5", "--json", files["json"], "--csv", files["csv"], "--trace", trace, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    for stage in (*STAGES, "decode_step", "end_to_end", "tokens/s", "speedup vs 1st"):
        assert stage in proc.stdout

    data = json.loads(files["json"].read_text())
    env = data["environment"]
    assert env["cores"] >= 1 and env["onnxruntime"] and "CPUExecutionProvider" in env["providers"]
    assert len(data["profiles"]) == 2 and data["settings"]["new_tokens"] == 5
    p = data["profiles"][0]
    assert p["stages"]["decode_step"]["n"] == 3 * 4  # 5 tokens: the first from prefill, 4 decode steps
    assert p["stages"]["end_to_end"]["p50"] <= p["stages"]["end_to_end"]["max"]

    rows = list(csv.DictReader(files["csv"].open()))
    assert {r["stage"] for r in rows} >= {*STAGES, "end_to_end"}
    assert all(r["env_onnxruntime"] == env["onnxruntime"] for r in rows)

    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    stage_events = [e for e in events if e["cat"] == "stage"]
    assert [e["name"] for e in stage_events] == list(STAGES)
    assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-6 for a, b in zip(stage_events, stage_events[1:]))
    assert sum(e["cat"] == "decode_step" for e in events) == 4

    with Image.open(png) as im:
        im.load()
        assert im.size[0] > 400 and im.size[1] > 200


def test_stages_add_up_to_end_to_end(toy_artifacts):
    images = [im for _, im in synthetic.make_scenes(2, seed=1)]
    prof = profile_artifacts(toy_artifacts, images, ProfileOptions(runs=4, warmup=1, new_tokens=6))
    for run in prof["runs"]:
        parts = sum(run[s] for s in STAGES)
        assert parts <= run["total"]
        assert run["total"] - parts < max(0.002, 0.1 * run["total"])  # only option checks lie outside
        assert sum(run["decode_steps"]) <= run["decode"]
    assert prof["tokens_per_s"] == pytest.approx(6 / prof["stages"]["end_to_end"]["mean"])


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
    s = summarize([four, six])
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
