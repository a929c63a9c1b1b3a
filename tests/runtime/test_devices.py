"""Device selection; the CUDA checks run only where ONNX Runtime has its CUDA provider."""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest

from runtime import synthetic
from runtime.backends.onnxrt import providers_for
from runtime.errors import Blip2EdgeError
from runtime.pipeline import Blip2Pipeline

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only fallbacks")
def test_auto_falls_back_to_cpu_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert providers_for("auto") == ["CPUExecutionProvider"]
    assert "running on the CPU" in caplog.text


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only fallbacks")
def test_cuda_without_provider_names_the_extra():
    with pytest.raises(Blip2EdgeError, match=r"blip2-edge\[gpu\]"):
        providers_for("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_tokens_match_cpu(toy_artifacts):
    images = [im for _, im in synthetic.make_scenes(4, seed=8)]
    cpu = Blip2Pipeline.from_artifacts(toy_artifacts, device="cpu")
    gpu = Blip2Pipeline.from_artifacts(toy_artifacts, device="cuda")
    assert gpu.io_binding
    for kw in (dict(), dict(num_beams=3)):
        assert [r.tokens for r in gpu.caption(images, **kw)] == [r.tokens for r in cpu.caption(images, **kw)]
