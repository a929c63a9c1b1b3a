"""Session fixtures: each model is built and exported once per test session.

Real components throughout: random-weight checkpoints written in HF format, real ONNX exports,
real ONNX Runtime sessions, the real committed toy model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def exported(tmp_path_factory, source, name: str, **options) -> Path:
    """`source` (a checkpoint directory) exported quietly into a fresh temporary `name`, with
    ExportOptions(**options)."""
    from exporter.export import ExportOptions, export

    out = tmp_path_factory.mktemp("art") / name
    export(str(source), out, ExportOptions(**options), log=lambda s: None)
    return out


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory):
    """The runtime's sha256 cache lives under XDG_CACHE_HOME: point it at a temporary directory
    so tests (and the CLIs they start, which inherit the environment) never touch the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from exporter.random_models import make_model

    return make_model("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_checkpoint) -> Path:

    return exported(tmp_path_factory, tiny_checkpoint, "tiny")


@pytest.fixture(scope="session")
def tiny_concat_artifacts(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint with the concat KV cache (fp32 exports default to the shared one)."""

    return exported(tmp_path_factory, tiny_checkpoint, "tiny-concat", kv_cache="concat")


@pytest.fixture(scope="session")
def toy_artifacts(tmp_path_factory) -> Path:
    from exporter.toy import CHECKPOINT_DIR

    return exported(tmp_path_factory, CHECKPOINT_DIR, "toy")


@pytest.fixture(scope="session")
def toy_concat_artifacts(tmp_path_factory) -> Path:
    """The toy with the concat KV cache: the form CUDA runs in fp32 and the TensorRT provider runs."""
    from exporter.toy import CHECKPOINT_DIR

    return exported(tmp_path_factory, CHECKPOINT_DIR, "toy-concat", kv_cache="concat")


@pytest.fixture(scope="session")
def tiny_hf(tiny_checkpoint):
    from exporter.loading import LoadOptions, load_model

    return load_model(str(tiny_checkpoint), LoadOptions())


@pytest.fixture(scope="session")
def toy_hf():
    from exporter.loading import LoadOptions, load_model
    from exporter.toy import CHECKPOINT_DIR

    return load_model(str(CHECKPOINT_DIR), LoadOptions())


def scaled_t5_toy(out: Path, suffixes: tuple[str, ...], factor: float) -> Path:
    """A copy of the Flan-T5 toy checkpoint at `out`, its weights whose names end with `suffixes`
    multiplied by `factor` (float16 overflow cases: tests/runtime/test_parity_t5.py)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from exporter.toy import CHECKPOINT_T5_DIR

    shutil.copytree(CHECKPOINT_T5_DIR, out)
    weights = load_file(out / "model.safetensors")
    scaled = [k for k in weights if k.endswith(suffixes)]
    assert scaled, suffixes
    for k in scaled:
        weights[k] = weights[k] * factor
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs the real console entry point in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)


@pytest.fixture(scope="session")
def t5_tiny_checkpoint(tmp_path_factory) -> Path:
    from exporter.random_models import make_model

    return make_model("tiny", tmp_path_factory.mktemp("ckpt") / "t5-tiny", llm="t5", seed=3)


@pytest.fixture(scope="session")
def t5_tiny_artifacts(tmp_path_factory, t5_tiny_checkpoint) -> Path:

    return exported(tmp_path_factory, t5_tiny_checkpoint, "t5-tiny")


@pytest.fixture(scope="session")
def llama_tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random BLIP-2 with a LLaMA LLM: grouped-query attention (2 KV heads for 4) and an
    untied lm_head."""
    from exporter.random_models import make_model

    return make_model("tiny", tmp_path_factory.mktemp("ckpt") / "llama-tiny", llm="llama", seed=5)


@pytest.fixture(scope="session")
def llama_tiny_artifacts(tmp_path_factory, llama_tiny_checkpoint) -> Path:

    return exported(tmp_path_factory, llama_tiny_checkpoint, "llama-tiny")


@pytest.fixture(scope="session")
def retrieval_tiny_checkpoint(tmp_path_factory) -> Path:
    from exporter.random_models import make_retrieval_model

    return make_retrieval_model("tiny", tmp_path_factory.mktemp("ckpt") / "retrieval-tiny", seed=5)


@pytest.fixture(scope="session")
def retrieval_tiny_artifacts(tmp_path_factory, retrieval_tiny_checkpoint) -> Path:

    return exported(tmp_path_factory, retrieval_tiny_checkpoint, "retrieval-tiny")


@pytest.fixture(scope="session")
def retrieval_toy_artifacts(tmp_path_factory) -> Path:
    from exporter.toy import CHECKPOINT_RETRIEVAL_DIR

    return exported(tmp_path_factory, CHECKPOINT_RETRIEVAL_DIR, "retrieval-toy")


@pytest.fixture(scope="session")
def retrieval_tiny_other_artifacts(tmp_path_factory) -> Path:
    """Another tiny retrieval model (other weights): vectors that must never be mixed with the first's."""
    from exporter.random_models import make_retrieval_model

    ckpt = make_retrieval_model("tiny", tmp_path_factory.mktemp("ckpt") / "retrieval-tiny-other", seed=6)
    return exported(tmp_path_factory, ckpt, "retrieval-tiny-other")


@pytest.fixture(scope="session")
def instructblip_t5_tiny_checkpoint(tmp_path_factory) -> Path:
    from exporter.random_models import make_model

    return make_model("tiny", tmp_path_factory.mktemp("ckpt") / "ib-t5-tiny", llm="t5", seed=3, arch="instructblip")


@pytest.fixture(scope="session")
def instructblip_t5_tiny_artifacts(tmp_path_factory, instructblip_t5_tiny_checkpoint) -> Path:

    return exported(tmp_path_factory, instructblip_t5_tiny_checkpoint, "ib-t5-tiny")


@pytest.fixture(scope="session")
def instructblip_llama_tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random InstructBLIP with a LLaMA (Vicuna-style) LLM."""
    from exporter.random_models import make_model

    return make_model("tiny", tmp_path_factory.mktemp("ckpt") / "ib-llama-tiny", llm="llama", seed=5,
                      arch="instructblip")
