"""The up-front memory check of `export` and `quantize`: the expected peak is printed before
anything is loaded, and a run that would not fit `--max-memory` (or the memory available) is
refused in one line with nothing written; what the estimate reads from a checkpoint. The peak
itself is measured in bench/export_bench.py, never asserted here."""

from __future__ import annotations

import pytest

from exporter.export import ExportOptions, export
from exporter.memory_estimate import export_peak, stage_parameters, stored_sizes
from runtime.host_memory import MemoryBudgetError
from tests.conftest import run_cli


def _one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


def test_export_refuses_a_max_memory_too_small_and_writes_nothing(tmp_path, tiny_checkpoint):
    out = tmp_path / "new" / "art"
    proc = run_cli("export", tiny_checkpoint, out, "--max-memory", "100MB")
    line = _one_line(proc)
    assert line.startswith("error: export needs about ") and "more than --max-memory 100 MB" in line, line
    assert line.endswith("; free memory, or run it on a machine with more")  # no option would fit
    assert list(tmp_path.iterdir()) == []  # not OUT_DIR, not its parent, no lock, no partial directory


def test_export_prints_the_estimate_and_runs_within_a_budget_that_fits(tmp_path, tiny_checkpoint):
    lines = []
    export(str(tiny_checkpoint), tmp_path / "art", ExportOptions(max_memory=64 * 10**9, validate=False),
           log=lines.append)
    assert lines[0].startswith("export: expected peak memory ") and "of checkpoint mapped from disk" in lines[0] \
        and lines[0].endswith(("(--max-memory)", "(available memory)")), lines[0]
    assert lines.index(lines[0]) < next(i for i, s in enumerate(lines) if s.startswith("loaded "))
    assert (tmp_path / "art" / "manifest.json").is_file()


def test_the_refusal_comes_before_any_weight_is_read(tmp_path, tiny_checkpoint):
    """A checkpoint whose weights are unreadable is refused for memory first: the estimate
    reads the config and the safetensors headers only."""
    import shutil

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    head = weights.read_bytes()[:8 + int.from_bytes(weights.read_bytes()[:8], "little")]
    weights.write_bytes(head)  # the header alone: every tensor's bytes are gone
    with pytest.raises(MemoryBudgetError, match="more than --max-memory 10 MB"):
        export(str(ckpt), tmp_path / "art", ExportOptions(max_memory=10**7), log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("value, message", [("12", "--max-memory '12': no unit"),
                                            ("12G", "--max-memory '12G': unknown unit 'G'"),
                                            ("lots", "--max-memory 'lots': not a size")])
def test_max_memory_parse_errors(tmp_path, tiny_checkpoint, value, message):
    proc = run_cli("export", tiny_checkpoint, tmp_path / "art", "--max-memory", value)
    assert _one_line(proc).startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_stored_sizes_read_the_headers_of_every_shard(tmp_path, tiny_checkpoint):
    from exporter.random_models import make_model

    sharded = make_model("tiny", tmp_path / "fp16", dtype="fp16", max_shard_size=100_000)
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    sizes = stored_sizes(sharded)
    assert sizes["vision_model.encoder.layers.0.mlp.fc1.weight"] == 2 and sizes["query_tokens"] == 4  # kept in fp32
    assert set(stored_sizes(tiny_checkpoint).values()) == {4}
    assert stored_sizes(tmp_path / "nowhere") is None


def test_weights_cast_on_load_are_counted_as_copies(tiny_checkpoint):
    """An fp32 checkpoint exported in fp32 is mapped from its file (no copy); exported in fp16,
    every weight but the Q-Former's and the query tokens' is cast into a copy."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    params = stage_parameters(config)
    stored = stored_sizes(tiny_checkpoint)
    fp32 = export_peak(config, "fp32", True, params, stored)
    fp16 = export_peak(config, "fp16", True, params, stored)
    assert fp32["converted"] == 0 and fp32["mapped"] > fp32["model"]
    kept = sum(n for name, n, k in params["model"] if k)
    assert kept > 0 and fp16["converted"] == fp16["model"] - 4 * kept
    assert fp32["peak"] == max(fp32["phases"].values()) and set(fp32["phases"]) == \
        {"load", "export vision", "export qformer", "export decoder", "references", "validation"}
    assert not {"references", "validation"} & set(export_peak(config, "fp32", False, params, stored)["phases"])


def test_released_shapes_on_paper():
    """The 13B / XXL shapes, which cannot be built here, through the estimate: from an fp16
    checkpoint, a validated fp16 export of each needs more than a 24 GB machine holds resident
    (Flan-T5-XXL's anonymous peak, one stage at a time, would fit; its 28 GB of checkpoint,
    mapped for the references, would not), and the largest stage is the LLM's (the T5 decoder
    holds its lm_head beside the same layers)."""
    from exporter.random_models import build_config

    for name in ("blip2-flan-t5-xxl", "instructblip-vicuna-13b"):
        config = build_config(name)
        params = stage_parameters(config)
        stored = {n: 4 if kept else 2 for n, _, kept in params["model"]}
        fp16 = export_peak(config, "fp16", True, params, stored)
        assert fp16["rss"] > 24e9 and fp16["converted"] == 0
        assert max(fp16["stages"], key=fp16["stages"].get) == "decoder"


def test_the_refusal_names_the_options_that_would_fit(tmp_path):
    """The bench shapes stored in fp16 (nothing built: the config and the estimate alone): an
    fp32 export casts every weight into a copy; a budget below its peak and above --dtype fp16's
    makes the refusal name that option, and not --no-validate, whose peak is the same (the
    decoder's export, not validation, sets it)."""
    from exporter.random_models import build_config
    from runtime.host_memory import available, resident

    config = build_config("bench")
    config.dtype = "float16"
    config.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")  # the estimate reads no weights
    params = stage_parameters(config)
    fp32 = export_peak(config, "fp32", True, params)["peak"]
    fp16 = export_peak(config, "fp16", True, params)["peak"]
    assert export_peak(config, "fp32", False, params)["peak"] == fp32 > fp16
    budget = (fp32 + fp16) // 2
    if available() + resident() < budget:
        pytest.skip(f"needs {budget / 1e9:.1f} GB available for the budget to be --max-memory's")
    with pytest.raises(MemoryBudgetError) as exc:
        export(str(tmp_path / "ckpt"), tmp_path / "art", ExportOptions(max_memory=budget), log=lambda s: None)
    message = str(exc.value)
    assert message.endswith(f"; --dtype fp16 needs about {fp16 / 1e9:.1f} GB"), message
    assert not (tmp_path / "art").exists()
