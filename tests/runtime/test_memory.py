"""runtime.artifact.memory: the weight memory of an artifact directory, from its files, as `profile` shows it."""

from __future__ import annotations

import json

from runtime.artifact.manifest import load_manifest
from runtime.artifact.memory import artifact_weights
from tests.conftest import run_cli


def test_weights_are_each_stage_s_files_and_the_embeddings(llama_tiny_artifacts):
    w = artifact_weights(load_manifest(llama_tiny_artifacts))
    for stage in ("vision", "qformer", "decoder"):
        assert w["stages"][stage] == {"precision": "fp32",
                                      "bytes": (llama_tiny_artifacts / f"{stage}.onnx").stat().st_size}
    assert w["embeddings"] == (llama_tiny_artifacts / "embed_tokens.npy").stat().st_size
    assert w["total"] == w["embeddings"] + sum(s["bytes"] for s in w["stages"].values())


def test_profile_reports_the_weights(llama_tiny_artifacts, tmp_path):
    out = tmp_path / "p.json"
    proc = run_cli("profile", llama_tiny_artifacts, "--synthetic", "1", "--runs", "1", "--warmup", "0",
                   "--json", out)
    assert proc.returncode == 0, proc.stderr
    total = artifact_weights(load_manifest(llama_tiny_artifacts))["total"]
    assert "weights MB: vision " in proc.stdout and f"total {total / 1e6:.1f}" in proc.stdout
    assert json.loads(out.read_text())["profiles"][0]["weights"]["total"] == total
