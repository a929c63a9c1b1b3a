"""Device selection; the CUDA checks run only where ONNX Runtime has its CUDA provider."""

from __future__ import annotations

import logging
import re

import onnxruntime as ort
import pytest

from runtime import synthetic
from runtime.backends.onnxrt import ThreadSettings, providers_for
from runtime.errors import Blip2EdgeError, install_command
from runtime.pipeline import Blip2Pipeline

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only fallbacks")
def test_auto_falls_back_to_cpu_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert providers_for("auto") == ["CPUExecutionProvider"]
    assert "running on the CPU" in caplog.text


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only fallbacks")
def test_cuda_without_provider_names_the_extra():
    with pytest.raises(Blip2EdgeError, match=re.escape(install_command("gpu"))):
        providers_for("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_tokens_match_cpu(toy_concat_artifacts):
    """fp32 on CUDA: the concat KV cache (the shared one's CUDA kernel is fp16 only)."""
    images = [im for _, im in synthetic.make_scenes(4, seed=8)]
    cpu = Blip2Pipeline.from_artifacts(toy_concat_artifacts, device="cpu")
    # TF32 off: it rounds FP32 matrix products' inputs, which changes tokens on random weights with beams.
    gpu = Blip2Pipeline.from_artifacts(toy_concat_artifacts, device="cuda", threads=ThreadSettings(tf32=False))
    assert gpu.io_binding
    for kw in (dict(), dict(num_beams=3)):
        assert [r.tokens for r in gpu.caption(images, **kw)] == [r.tokens for r in cpu.caption(images, **kw)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_fp16_shared_cache_matches_the_concat_one(tmp_path):
    """GroupQueryAttention's CUDA kernel (fp16) on the shared KV cache, against the concat form
    of the same fp16 export on the same GPU: same tokens, greedy and beams, prompts of different
    lengths in one batch."""
    from exporter.export import ExportOptions, export
    from exporter.loading import LoadOptions
    from exporter.toy import CHECKPOINT_DIR

    arts = {}
    for form in ("shared", "concat"):
        arts[form] = tmp_path / form
        export(str(CHECKPOINT_DIR), arts[form], ExportOptions(kv_cache=form, load=LoadOptions(dtype="fp16")),
               log=lambda s: None)
    images = [im for _, im in synthetic.make_scenes(4, seed=8)]
    pipes = {form: Blip2Pipeline.from_artifacts(a, device="cuda") for form, a in arts.items()}
    # Prompts of different lengths: the shared form's rows packed to the front, right-padded.
    prompts = ["", "Question: what colour is it? Answer:", "a photo of", "Question: where is it? Answer:"]
    for kw in (dict(), dict(num_beams=3)):
        assert [r.tokens for r in pipes["shared"].generate(images, prompts, **kw)] == \
            [r.tokens for r in pipes["concat"].generate(images, prompts, **kw)]
