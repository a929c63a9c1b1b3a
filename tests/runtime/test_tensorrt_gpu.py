"""What only a device proves: real engines built, run, compared and freed. Marked `gpu`; they skip
with a reason here (no GPU, no TensorRT). `bench/gpu_check.sh --full` runs them in one call.

Captions are compared with the CPU's token for token, so everything here computes FP32 without
TF32 (on by default in TensorRT and ONNX Runtime's CUDA provider, Ampere and newer): engines built
with --no-tf32, CUDA sessions with ThreadSettings(tf32=False), and NVIDIA_TF32_OVERRIDE=0 for the
TensorRT provider, which has no option of its own."""

from __future__ import annotations

import importlib.util
import shutil
import threading

import numpy as np
import pytest

from runtime.backends.onnxrt import ThreadSettings
from runtime.doctor.runs import TF32_OVERRIDE, cache_changes, cache_snapshot, cosine, engine_files
from tests.conftest import run_cli

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = shutil.which("nvidia-smi") is not None


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


needs_trt = pytest.mark.skipif(not (HAS_TRT and HAS_GPU), reason="needs TensorRT and an NVIDIA GPU")
needs_cuda_ep = pytest.mark.skipif("CUDAExecutionProvider" not in _ort_providers(),
                                   reason="needs onnxruntime-gpu with its CUDA provider")
pytestmark = pytest.mark.gpu
STRICT = ThreadSettings(tf32=False)


@pytest.fixture(scope="module")
def built(toy_concat_artifacts, tmp_path_factory):
    """The toy (FP32) with engines for both visual stages, two contexts, max batch 3."""
    if not (HAS_TRT and HAS_GPU):
        pytest.skip("needs TensorRT and an NVIDIA GPU")
    art = shutil.copytree(toy_concat_artifacts, tmp_path_factory.mktemp("gpu") / "art")
    cache = art.parent / "timing.cache"
    proc = run_cli("build-engines", art, "--contexts", "2", "--max-batch", "3", "--timing-cache", cache, "--no-tf32")
    assert proc.returncode == 0, proc.stderr
    assert cache.stat().st_size > 0
    from runtime.backends.tensorrt.engines import ENGINE_MANIFEST, read_engine_manifest

    (manifest,) = (art / "engines").glob(f"trt*/{ENGINE_MANIFEST}")
    assert all(e["flags"]["tf32"] is False for e in read_engine_manifest(manifest)["engines"].values())
    return art


def images(n):
    from runtime import synthetic

    return [im for _, im in synthetic.make_scenes(n, seed=11)]


@needs_trt
@needs_cuda_ep
def test_engines_match_ort_cpu_at_batch_1_at_the_maximum_and_split_above_it(built):
    from runtime.pipeline import Blip2Pipeline

    cpu = Blip2Pipeline.from_artifacts(built)
    trt = Blip2Pipeline.from_artifacts(built, backend="tensorrt", threads=STRICT)
    try:
        runner = trt.runners["vision"]
        assert runner.max_batch == 3 and runner.engine.num_optimization_profiles == 2
        for batch in (1, 3, 7):  # 7: split into 3 + 3 + 1
            pixels = cpu.preprocessing.batch(images(batch))
            a = cpu.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]
            b = runner.infer({"pixel_values": pixels})["image_embeds"]
            assert a.shape == b.shape and cosine(a, b) >= 0.999, batch
            qa = cpu.runners["qformer"].infer({"image_embeds": a})["query_embeds"]
            qb = trt.runners["qformer"].infer({"image_embeds": a})["query_embeds"]
            assert qa.shape == qb.shape and cosine(qa, qb) >= 0.999, batch
        assert runner.pool.created <= 2
    finally:
        trt.close()
    with pytest.raises(Exception, match="closed"):
        runner.infer({"pixel_values": cpu.preprocessing.batch(images(1))})


@needs_trt
@needs_cuda_ep
def test_tensorrt_captions_equal_cpu_and_two_threads_equal_sequential(built):
    from runtime.pipeline import Blip2Pipeline

    cpu = Blip2Pipeline.from_artifacts(built)
    trt = Blip2Pipeline.from_artifacts(built, backend="tensorrt", threads=STRICT)
    ims = images(4)
    try:
        expected = [r.tokens for r in cpu.caption(ims, max_new_tokens=12)]
        assert [r.tokens for r in trt.caption(ims, max_new_tokens=12)] == expected
        got = [None] * 4

        def one(i):
            got[i] = trt.caption([ims[i]], max_new_tokens=12)[0].tokens

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]  # 4 threads, 2 contexts
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert got == expected
    finally:
        trt.close()


@needs_trt
def test_a_shape_outside_the_profile_is_refused_naming_the_flag(built):
    from runtime.artifact.manifest import load_manifest
    from runtime.backends.tensorrt.engines import find_engine
    from runtime.backends.tensorrt.runner import TrtRunner, device_info
    from runtime.backends.tensorrt.shapes import ProfileShapeError

    m = load_manifest(built)
    with TrtRunner(find_engine(m, "vision", device_info()), m.stages["vision"]) as runner:
        size = m.stages["vision"]["inputs"][0]["shape"][2]
        with pytest.raises(ProfileShapeError, match="the model fixes it"):
            runner.infer({"pixel_values": np.zeros((1, 3, size + 8, size + 8), np.float32)})


@needs_trt
def test_a_timing_cache_from_elsewhere_is_replaced_and_the_engine_still_built(toy_concat_artifacts, tmp_path):
    art = shutil.copytree(toy_concat_artifacts, tmp_path / "art")
    cache = tmp_path / "bad.cache"
    cache.write_bytes(b"not a timing cache at all" * 10)
    proc = run_cli("build-engines", art, "--stages", "qformer", "--timing-cache", cache)
    assert proc.returncode == 0, proc.stderr
    assert "starting a new one" in proc.stderr and cache.read_bytes()[:25] != b"not a timing cache at all"


@needs_trt
@needs_cuda_ep
def test_int8_engines_from_gpu_qdq_graphs(toy_concat_artifacts, tmp_path):
    from calibration.quantize import QuantizeOptions, quantize
    from calibration.visual import VisualOptions
    from runtime.pipeline import Blip2Pipeline

    out = tmp_path / "q"
    quantize(toy_concat_artifacts, out, QuantizeOptions(num_calib=16, held_out=8, gate=False,
                                                 visual=VisualOptions(target="gpu")), log=lambda s: None)
    proc = run_cli("build-engines", out, "--int8")
    assert proc.returncode == 0, proc.stderr
    cpu, trt = Blip2Pipeline.from_artifacts(out), Blip2Pipeline.from_artifacts(out, backend="tensorrt")
    try:
        pixels = cpu.preprocessing.batch(images(2))
        a = cpu.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]
        b = trt.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]
        assert cosine(a, b) >= 0.98
    finally:
        trt.close()


@needs_cuda_ep
def test_cuda_device_captions_equal_cpu(toy_concat_artifacts):
    from runtime.pipeline import Blip2Pipeline

    ims = images(2)
    cpu = Blip2Pipeline.from_artifacts(toy_concat_artifacts)
    gpu = Blip2Pipeline.from_artifacts(toy_concat_artifacts, device="cuda", threads=STRICT)
    assert gpu.runners["decoder"].session.get_providers()[0] == "CUDAExecutionProvider"
    assert [r.tokens for r in gpu.caption(ims, max_new_tokens=12)] == [r.tokens for r in cpu.caption(ims, max_new_tokens=12)]


@pytest.mark.skipif("TensorrtExecutionProvider" not in _ort_providers(), reason="needs ONNX Runtime's TensorRT provider")
def test_ort_trt_ep_is_really_tensorrt_and_builds_once_per_stage(toy_concat_artifacts, tmp_path, monkeypatch):
    import onnxruntime as ort

    from runtime.backends.tensorrt.engines import nvidia_device, ort_trt_cache_dir
    from runtime.pipeline import Blip2Pipeline

    monkeypatch.setenv(TF32_OVERRIDE, "0")  # read when TensorRT builds: a fresh cache is built below
    art = shutil.copytree(toy_concat_artifacts, tmp_path / "art")
    pipe = Blip2Pipeline.from_artifacts(art, backend="onnxruntime-trt", threads=STRICT)
    assert all(r.session.get_providers()[0] == "TensorrtExecutionProvider" for r in pipe.runners.values())
    ims = images(2)
    expected = [r.tokens for r in Blip2Pipeline.from_artifacts(art).caption(ims, max_new_tokens=8)]
    assert [r.tokens for r in pipe.caption(ims, max_new_tokens=8)] == expected
    cache = ort_trt_cache_dir(art, ort.__version__, nvidia_device())
    before = cache_snapshot(cache)
    assert engine_files(before), f"no engine cached in {cache}"
    pipe.caption(ims[:1], max_new_tokens=24)  # longer past lengths: no engine built again inside the profile
    # A rebuild overwrites the same file name: compared by content, size, mtime and inode.
    assert cache_changes(before, cache_snapshot(cache)) == []


@needs_trt
def test_doctor_on_the_device_has_no_failures(built):
    proc = run_cli("doctor", built)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_cuda_ep
def test_doctor_skips_gpu_runs_an_fp32_shared_cache_cannot_make(toy_artifacts):
    """The default fp32 export keeps the shared KV cache, which CUDA cannot run in fp32: the GPU
    runs are skipped with the export that would run there, and doctor passes; asked for by
    name, the run fails."""
    proc = run_cli("doctor", toy_artifacts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--kv-cache concat" in proc.stdout
    proc = run_cli("doctor", toy_artifacts, "--backend", "cuda")
    assert proc.returncode != 0 and "--kv-cache concat" in proc.stdout + proc.stderr
