"""Runs one TensorRT engine: numpy in, numpy out.

Safe under concurrency by construction: each call takes a slot from a bounded pool (pool.py),
one per optimization profile of the engine, each with its own execution context (bound to that
profile), CUDA stream and device buffers, which later calls reuse; close() frees them all. A
batch above the profile's maximum is split into batches that fit; any other shape outside the
profile is refused naming the build-engines flag (shapes.py).

Written against TensorRT 10.3/11.0's Python bindings (Runtime.deserialize_cuda_engine,
ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype /
num_optimization_profiles / get_tensor_profile_shape / create_execution_context,
IExecutionContext.set_optimization_profile_async (raises on failure) / set_input_shape (returns
a bool) / get_tensor_shape / set_tensor_address / execute_async_v3) and cuda-python 12.x's
runtime module (cudaStreamCreate/Destroy, cudaMalloc/Free, cudaMemcpyAsync,
cudaStreamSynchronize, cudaGetDeviceProperties), as TensorRT's samples/python/common_runtime.py
uses them. Not run on this project's machines (no GPU with TensorRT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.backends.tensorrt.pool import DeviceBuffers, SlotPool
from runtime.backends.tensorrt.shapes import batch_limit, batch_slices, check_shapes
from runtime.backends.tensorrt.versions import import_cudart, import_tensorrt, trt_logger
from runtime.errors import Blip2EdgeError

WHAT = "the TensorRT backend"


def cuda_check(cudart, result, what: str):
    """cuda-python returns (error, *values): the values, or a one-line error naming the call."""
    err, *values = result if isinstance(result, tuple) else (result,)
    code = int(getattr(err, "value", err))
    if code != 0:
        try:
            name = cudart.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001  (the name is a nicety; the code is the fact)
            name = "unknown"
        raise Blip2EdgeError(f"CUDA error {code} ({name}) in {what}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def native_handle(obj) -> int:
    """The address of a cuda-python object (a stream) as TensorRT's bindings take it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-python >= 12.9; int() is deprecated there

        return int(get_cuda_native_handle(obj))
    except (ImportError, TypeError):  # older cuda-python, or a type with no registered getter
        return int(obj)


def device_info():
    """The current GPU and TensorRT version, as the engine manifest records them."""
    from runtime.backends.tensorrt.engines import DeviceInfo

    trt = import_tensorrt(WHAT)
    cudart = import_cudart(WHAT)
    props = cuda_check(cudart, cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(gpu=name.strip("\x00 "), compute_capability=f"{props.major}.{props.minor}",
                      trt_version=trt.__version__)


@dataclass
class Slot:
    context: object
    stream: object
    handle: int
    buffers: DeviceBuffers


class TrtRunner:
    """Deserialises the bytes engines.find_engine verified, and runs them."""

    device = "cuda"

    def __init__(self, engine, stage: dict):
        """engine: an engines.VerifiedEngine; stage: the manifest's spec of its stage."""
        self.trt = trt = import_tensorrt(WHAT)
        self.cudart = import_cudart(WHAT)
        self.name = str(engine.path)
        self.runtime = trt.Runtime(trt_logger(trt))  # one logger per process, shared with the builder
        self.engine = self.runtime.deserialize_cuda_engine(engine.data)  # the verified bytes, not a re-read
        if self.engine is None:
            raise Blip2EdgeError(f"{engine.path}: TensorRT could not deserialise the engine; rebuild it")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.spec_inputs = [t for t in stage["inputs"] if t["name"] in self.input_names]
        self.batch_outputs = {t["name"] for t in stage["outputs"] if t["shape"] and t["shape"][0] == "batch"}
        # Every profile was built with the same ranges (build-engines): profile 0's stand for all.
        self.limits = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)) for n in self.input_names}
        self.max_batch = batch_limit(self.spec_inputs, self.limits)
        self.pool = SlotPool(self.engine.num_optimization_profiles, self._make_slot, self._destroy_slot)

    # ---- slots -------------------------------------------------------------------------------

    def _make_slot(self, profile: int) -> Slot:
        cudart = self.cudart
        stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        context = self.engine.create_execution_context()
        if context is None:
            cuda_check(cudart, cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")
            raise Blip2EdgeError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?)")
        handle = native_handle(stream)
        context.set_optimization_profile_async(profile, handle)  # raises RuntimeError on failure
        cuda_check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        buffers = DeviceBuffers(lambda n: cuda_check(cudart, cudart.cudaMalloc(n), "cudaMalloc"),
                                lambda p: cuda_check(cudart, cudart.cudaFree(p), "cudaFree"))
        return Slot(context, stream, handle, buffers)

    def _destroy_slot(self, slot: Slot) -> None:
        cuda_check(self.cudart, self.cudart.cudaStreamSynchronize(slot.stream), "cudaStreamSynchronize")
        slot.buffers.close()
        slot.context = None  # the context goes before its stream and engine
        cuda_check(self.cudart, self.cudart.cudaStreamDestroy(slot.stream), "cudaStreamDestroy")

    def close(self) -> None:
        """Frees every context, stream and device buffer this runner created."""
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- inference ---------------------------------------------------------------------------

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise Blip2EdgeError(f"{self.name}: missing input(s) {', '.join(missing)}")
        arrays = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names}
        split = self.max_batch is not None and set(self.output_names) <= self.batch_outputs
        check_shapes({n: a.shape for n, a in arrays.items()}, self.spec_inputs, self.limits, self.name, split)
        batch = next(iter(arrays.values())).shape[0] if split else 0
        if not split or batch <= self.max_batch:
            return self._run(arrays)
        parts = [self._run({n: a[rows] for n, a in arrays.items()}) for rows in batch_slices(batch, self.max_batch)]
        return {n: np.concatenate([p[n] for p in parts], axis=0) for n in self.output_names}

    def _run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self.pool.acquire() as slot:
            try:
                context = slot.context
                for name, host in arrays.items():
                    if not context.set_input_shape(name, host.shape):
                        raise Blip2EdgeError(f"{self.name}: TensorRT refused shape {host.shape} for input '{name}'")
                    pointer = slot.buffers.get(name, host.nbytes)
                    cuda_check(cudart, cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, h2d, slot.stream),
                               "cudaMemcpyAsync")
                    context.set_tensor_address(name, pointer)
                outputs = {}
                for name in self.output_names:
                    shape = tuple(context.get_tensor_shape(name))
                    if any(d < 0 for d in shape):
                        raise Blip2EdgeError(f"{self.name}: output '{name}' has no shape ({shape}) for these inputs")
                    host = np.empty(shape, dtype=self.dtypes[name])
                    pointer = slot.buffers.get(name, host.nbytes)
                    context.set_tensor_address(name, pointer)
                    outputs[name] = (host, pointer)
                if not context.execute_async_v3(slot.handle):
                    raise Blip2EdgeError(f"{self.name}: TensorRT execution failed (see its log above)")
                for host, pointer in outputs.values():
                    cuda_check(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes, d2h, slot.stream),
                               "cudaMemcpyAsync")
                # The host arrays stay referenced until the copies are done; the clock is read after this.
                cuda_check(cudart, cudart.cudaStreamSynchronize(slot.stream), "cudaStreamSynchronize")
            except BaseException:
                # Nothing queued on this slot's stream may outlive the call (its host arrays go).
                cudart.cudaStreamSynchronize(slot.stream)
                raise
        return {name: host for name, (host, _) in outputs.items()}
