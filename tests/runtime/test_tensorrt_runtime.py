"""The TensorRT backend's logic that needs no GPU, on real objects: version gates, the context
pool under real threads, reused device buffers, profile shape checks and batch splitting, the
timing-cache fallbacks. What only a device proves is in test_tensorrt_gpu.py."""

from __future__ import annotations

import re
import threading
import types

import pytest

from runtime.artifact.manifest import load_manifest
from runtime.backends.tensorrt import versions
from runtime.backends.tensorrt.builder import (
    BuildOptions,
    attach_timing_cache,
    network_flags,
    serialized_timing_cache,
    set_tf32,
)
from runtime.backends.tensorrt.pool import DeviceBuffers, SlotPool
from runtime.backends.tensorrt.profiles import ProfileRanges, Range, stage_profile
from runtime.backends.tensorrt.shapes import ProfileShapeError, batch_limit, batch_slices, check_shapes
from runtime.errors import Blip2EdgeError, OptionError, install_command

# ---- versions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["8.5.2.2", "8.6.2.3", "10.0.1", "10.2.0.post1"])
def test_tensorrt_before_10_3_is_refused_in_one_line(version):
    with pytest.raises(versions.UnsupportedVersionError) as err:
        versions.check_tensorrt_version(version)
    message = str(err.value)
    assert "\n" not in message and f"TensorRT {version} is too old" in message
    assert "JetPack 6.1" in message and "--system-site-packages" in message and install_command("tensorrt") in message


@pytest.mark.parametrize("version", ["10.3.0", "10.3.0.30", "10.16.1.11", "11.0.0.114", "11.4.0.106"])
def test_tensorrt_10_3_to_11_is_accepted(version):
    assert versions.check_tensorrt_version(version)[:2] >= (10, 3)


def test_tensorrt_12_is_refused():
    with pytest.raises(versions.UnsupportedVersionError, match=r"newer than this blip2-edge supports.*tensorrt-cu12>=10.3,<11"):
        versions.check_tensorrt_version("12.0.0")


def test_cuda_python_must_be_12():
    versions.check_cuda_python_version("12.9.4")
    versions.check_cuda_python_version("12.6.2.post1")
    with pytest.raises(versions.UnsupportedVersionError, match=r"cuda-python 13.4.4 .*cuda-python>=12.3,<13"):
        versions.check_cuda_python_version("13.4.4")


@pytest.mark.parametrize("driver", [12020, 12040, 12060, 12080, 12090, 13000])
def test_any_cuda_12_driver_runs_cuda_python_12(driver):
    """cuda-python 12.9 answers cudaRuntimeGetVersion with 12090 whatever runtime is loaded; CUDA's
    minor-version compatibility runs it on JetPack 6's 12.2/12.6 drivers and desktop 12.4-12.8 ones."""
    versions.check_driver(driver, 12090)
    versions.check_driver(driver, 12030)


def test_a_driver_of_an_older_cuda_major_is_refused_naming_a_real_driver():
    with pytest.raises(versions.UnsupportedVersionError) as err:
        versions.check_driver(11040, 12090)  # JetPack 5's CUDA 11.4 driver
    message = str(err.value)
    assert "CUDA 11.4" in message and "CUDA 12.x" in message and "R525 driver or newer" in message
    assert "JetPack 6.1" in message and "==" not in message and "\n" not in message
    with pytest.raises(versions.UnsupportedVersionError, match="R580 driver or newer"):
        versions.check_driver(12080, 13000)
    with pytest.raises(versions.UnsupportedVersionError, match="no NVIDIA driver"):
        versions.check_driver(0, 12060)
    assert versions.cuda_version_text(12090) == "12.9"


class LoggerSeam:
    """tensorrt.Logger as the bindings declare it (Logger(min_severity), Logger.WARNING): counts
    how many were made, which is what TensorRT warns about (it keeps the first one it is given)."""

    WARNING = 2
    made: list = []

    def __init__(self, severity):
        self.severity = severity
        LoggerSeam.made.append(self)


def test_one_tensorrt_logger_per_process_whoever_asks_and_from_any_thread():
    trt = types.SimpleNamespace(Logger=LoggerSeam)
    LoggerSeam.made = []
    loggers = []
    threads = [threading.Thread(target=lambda: loggers.append(versions.trt_logger(trt))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(LoggerSeam.made) == 1 and all(lg is LoggerSeam.made[0] for lg in loggers)
    assert LoggerSeam.made[0].severity == LoggerSeam.WARNING


def test_the_builder_and_the_runner_take_the_shared_logger():
    """No TensorRT module here to build with: the code is read instead. Every Logger in the runtime
    is made by versions.trt_logger."""
    import ast

    from tests.conftest import REPO

    made = []
    for path in sorted((REPO / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Logger":
                made.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert made == ["runtime/backends/tensorrt/versions.py:" + str(_logger_line())]


def _logger_line() -> int:
    import inspect

    lines, start = inspect.getsourcelines(versions.trt_logger)
    return start + next(i for i, line in enumerate(lines) if "trt.Logger(" in line)


def test_network_is_strongly_typed_on_10_and_11():
    """TensorRT 10 needs the STRONGLY_TYPED bit (kSTRONGLY_TYPED = 1 in 10.x's NvInfer.h); TensorRT
    11 is always strongly typed and renumbered the enum (kSTRONGLY_TYPED = 0, deprecated and
    ignored; 1 is now kPREFER_JIT_PYTHON_PLUGINS), so it gets no flags at all."""
    ten = types.SimpleNamespace(STRONGLY_TYPED=1)
    eleven = types.SimpleNamespace(STRONGLY_TYPED=0, PREFER_JIT_PYTHON_PLUGINS=1)
    assert network_flags(types.SimpleNamespace(__version__="10.3.0", NetworkDefinitionCreationFlag=ten)) == 1 << 1
    assert network_flags(types.SimpleNamespace(__version__="11.4.0.106", NetworkDefinitionCreationFlag=eleven)) == 0


def test_build_options_are_checked():
    assert BuildOptions(contexts=3).flags() == {"strongly_typed": True, "workspace_mb": 2048,
                                                "optimization_level": 3, "contexts": 3, "tf32": True}
    for bad in ({"contexts": 0}, {"contexts": 9}, {"optimization_level": 6}, {"workspace_mb": 10}):
        with pytest.raises(OptionError):
            BuildOptions(**bad)


class FlagsSeam:
    """IBuilderConfig's set_flag / clear_flag / get_flag over a bit set that starts as TensorRT's
    default (TF32 allowed); BuilderFlag.TF32 is 6 in 10.3's and 11's NvInfer.h."""

    def __init__(self):
        self.bits = {6}

    def set_flag(self, flag):
        self.bits.add(flag)

    def clear_flag(self, flag):
        self.bits.discard(flag)

    def get_flag(self, flag):
        return flag in self.bits


@pytest.mark.parametrize("argv, tf32", [([], True), (["--no-tf32"], False)])
def test_build_engines_no_tf32_clears_the_builder_flag_and_is_recorded(argv, tf32):
    from runtime.backends.tensorrt.cli import build_options
    from runtime.cli.main import build_parser

    argv = ["build-engines", "out/model", *argv]
    opts = build_options(build_parser(argv).parse_args(argv))
    assert opts.tf32 is tf32 and opts.flags()["tf32"] is tf32  # engines.json's flags
    trt = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(TF32=6))
    config = FlagsSeam()
    set_tf32(config, trt, opts.tf32)
    assert config.get_flag(6) is tf32
    config.bits.clear()  # a TensorRT whose default were off: the flag is set explicitly
    set_tf32(config, trt, opts.tf32)
    assert config.get_flag(6) is tf32


# ---- timing cache -------------------------------------------------------------------------------

class BuilderConfigSeam:
    """The four IBuilderConfig calls the timing-cache code makes, answering as TensorRT does
    for a cache from another device (set_timing_cache -> False) or a damaged one (None)."""

    def __init__(self, accepts_stored: bool, damaged: bool = False, cache_after_build=b"new cache"):
        self.accepts_stored, self.damaged, self.cache_after_build = accepts_stored, damaged, cache_after_build
        self.attached = None

    def create_timing_cache(self, data: bytes):
        return None if (self.damaged and data) else ("cache", bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False  # a mismatching cache is never used silently
        if cache[1] and not self.accepts_stored:
            return False
        self.attached = cache
        return True

    def get_timing_cache(self):
        if self.cache_after_build is None:
            return None
        return types.SimpleNamespace(serialize=lambda: memoryview(self.cache_after_build))


@pytest.mark.parametrize("damaged", [False, True])
def test_a_timing_cache_from_another_device_is_replaced_with_a_warning(tmp_path, damaged):
    warnings = []
    config = BuilderConfigSeam(accepts_stored=False, damaged=damaged)
    attach_timing_cache(config, b"old cache", tmp_path / "t.cache", warn=warnings.append)
    assert config.attached == ("cache", b"")  # a new, empty cache: the build goes on
    assert len(warnings) == 1 and "another TensorRT or GPU" in warnings[0] and "t.cache" in warnings[0]
    config = BuilderConfigSeam(accepts_stored=True)
    attach_timing_cache(config, b"old cache", tmp_path / "t.cache", warn=warnings.append)
    assert config.attached == ("cache", b"old cache") and len(warnings) == 1


def test_no_timing_cache_after_a_build_keeps_the_engine(tmp_path):
    warnings = []
    assert serialized_timing_cache(BuilderConfigSeam(True, cache_after_build=None), warn=warnings.append) is None
    assert "engine is kept" in warnings[0]
    assert serialized_timing_cache(BuilderConfigSeam(True), warn=warnings.append) == b"new cache"


def test_a_timing_cache_that_cannot_be_written_is_a_warning(tmp_path, capsys):
    from runtime.backends.tensorrt.cli import save_timing_cache

    save_timing_cache(tmp_path / "no-such-dir" / "t.cache", b"cache")
    assert "not saved" in capsys.readouterr().err
    save_timing_cache(tmp_path / "t.cache", b"cache")
    assert (tmp_path / "t.cache").read_bytes() == b"cache"


# ---- the context pool --------------------------------------------------------------------------

def test_pool_never_lends_more_slots_than_profiles_and_reuses_them():
    made, destroyed = [], []
    pool = SlotPool(2, make=lambda i: made.append(i) or {"profile": i, "busy": threading.Lock()},
                    destroy=destroyed.append)
    inside, peak, lock = [0], [0], threading.Lock()
    both_in = threading.Barrier(2, timeout=30)  # two callers do hold a slot at the same time
    errors = []

    def call(n):
        try:
            with pool.acquire() as slot:
                assert slot["busy"].acquire(blocking=False), "a slot lent to two callers at once"
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                if n < 2:
                    both_in.wait()
                with lock:
                    inside[0] -= 1
                slot["busy"].release()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert peak[0] == 2 and sorted(made) == [0, 1] and pool.created == 2  # one context per profile, reused
    pool.close()
    assert sorted(s["profile"] for s in destroyed) == [0, 1]
    with pytest.raises(Blip2EdgeError, match="closed"):
        with pool.acquire():
            pass


def test_a_slot_busy_at_close_is_destroyed_when_released_and_a_failed_make_frees_its_profile():
    destroyed = []
    attempts = []

    def make(i):
        attempts.append(i)
        if len(attempts) == 1:
            raise MemoryError("no room for a context")
        return f"slot{i}"

    pool = SlotPool(1, make, destroyed.append)
    with pytest.raises(MemoryError):
        with pool.acquire():
            pass
    with pool.acquire() as slot:
        assert slot == "slot0" and attempts == [0, 0]  # profile 0 was handed out again
        pool.close()
        assert destroyed == []
    assert destroyed == ["slot0"]


def test_device_buffers_are_reused_grown_and_freed():
    allocated, freed = [], []

    def alloc(n):
        allocated.append(n)
        return 0x1000 * len(allocated)

    buffers = DeviceBuffers(alloc, freed.append)
    a = buffers.get("pixel_values", 4096)
    assert buffers.get("pixel_values", 1024) == a and allocated == [4096]  # smaller: the same buffer
    b = buffers.get("pixel_values", 8192)
    assert b != a and freed == [a] and allocated == [4096, 8192]
    assert buffers.get("empty", 0) and allocated[-1] == 1  # a zero-size tensor still gets an address
    assert buffers.total_bytes == 8193
    buffers.close()
    assert sorted(freed) == sorted([a, b, 0x3000]) and buffers.total_bytes == 0


# ---- profile shapes and batch splitting -----------------------------------------------------------

@pytest.fixture(scope="module")
def visual_limits(tiny_artifacts):
    m = load_manifest(tiny_artifacts)
    ranges = ProfileRanges(batch=Range(1, 2, 4))
    return {s: (m.stages[s]["inputs"], stage_profile(m.stages[s], ranges)) for s in ("vision", "qformer")}


def test_batches_above_the_profile_are_split_others_refused_naming_the_flag(visual_limits):
    spec, limits = visual_limits["vision"]
    assert batch_limit(spec, limits) == 4
    check_shapes({"pixel_values": (4, 3, 32, 32)}, spec, limits, "vision.engine", split_batch=False)
    check_shapes({"pixel_values": (9, 3, 32, 32)}, spec, limits, "vision.engine", split_batch=True)
    with pytest.raises(ProfileShapeError, match=r"dim 0 \(batch\) is 9, outside the engine's profile \[1, 4\]; "
                                                r"rebuild with 'blip2-edge build-engines ... --max-batch 9'"):
        check_shapes({"pixel_values": (9, 3, 32, 32)}, spec, limits, "vision.engine", split_batch=False)
    with pytest.raises(ProfileShapeError, match=r"dim 2 \(32\) is 64.*\[32, 32\]; the model fixes it"):
        check_shapes({"pixel_values": (1, 3, 64, 64)}, spec, limits, "vision.engine", split_batch=True)
    with pytest.raises(ProfileShapeError, match="has 3 dims, the engine expects 4"):
        check_shapes({"pixel_values": (1, 3, 32)}, spec, limits, "vision.engine", split_batch=True)
    assert batch_slices(9, 4) == [slice(0, 4), slice(4, 8), slice(8, 9)]
    assert batch_slices(4, 4) == [slice(0, 4)]


def test_batch_below_the_profile_minimum_names_min_batch(tiny_artifacts):
    m = load_manifest(tiny_artifacts)
    spec = m.stages["qformer"]["inputs"]
    limits = stage_profile(m.stages["qformer"], ProfileRanges(batch=Range(2, 2, 4)))
    with pytest.raises(ProfileShapeError, match="--min-batch 1"):
        shape = (1, *limits[spec[0]["name"]][0][1:])
        check_shapes({spec[0]["name"]: shape}, spec, limits, "qformer.engine", split_batch=True)


def test_inputs_without_a_batch_axis_are_never_split():
    spec = [{"name": "ids", "shape": ["sequence"]}]
    assert batch_limit(spec, {"ids": ((1,), (1,), (8,))}) is None


@pytest.mark.skipif(versions.installed_version("tensorrt", "tensorrt-cu12") is not None,
                    reason="checks the message when TensorRT is missing")
def test_runner_without_tensorrt_names_the_extra(tmp_path):
    from runtime.backends.tensorrt.engines import VerifiedEngine
    from runtime.backends.tensorrt.runner import TrtRunner

    with pytest.raises(Blip2EdgeError, match=re.escape(install_command("tensorrt"))):
        TrtRunner(VerifiedEngine(tmp_path / "x.engine", b""), {"inputs": [], "outputs": []})
