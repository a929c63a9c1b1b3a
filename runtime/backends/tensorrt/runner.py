"""Runs one TensorRT engine: numpy in, numpy out, on its own CUDA stream.

Not run on this project's machines (no GPU with TensorRT). One execution context per thread:
contexts hold per-call shapes and addresses and must not be shared between threads.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from runtime.errors import Blip2EdgeError, require


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        cudart = require("cuda.cudart", "tensorrt", "the TensorRT backend")
    return cudart


def _check(result):
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise Blip2EdgeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def device_info():
    """The current GPU and TensorRT version, as the engine manifest records them."""
    from runtime.backends.tensorrt.engines import DeviceInfo

    trt = require("tensorrt", "tensorrt", "the TensorRT backend")
    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(gpu=name.strip("\x00 "), compute_capability=f"{props.major}.{props.minor}",
                      trt_version=trt.__version__)


class TrtRunner:
    """Deserialises an engine that engines.find_engine has checked, and runs it."""

    def __init__(self, engine_path: Path):
        self.trt = trt = require("tensorrt", "tensorrt", "the TensorRT backend")
        self.cudart = _cudart()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise Blip2EdgeError(f"{engine_path}: TensorRT could not deserialise the engine; rebuild it")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self._local = threading.local()

    def _context(self):
        if not hasattr(self._local, "context"):
            self._local.context = self.engine.create_execution_context()
            self._local.stream = _check(self.cudart.cudaStreamCreate())
        return self._local.context, self._local.stream

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, trt = self.cudart, self.trt
        context, stream = self._context()
        buffers, outputs = [], {}
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        try:
            for name in self.input_names:
                host = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                context.set_input_shape(name, host.shape)
                ptr = _check(cudart.cudaMallocAsync(max(host.nbytes, 1), stream))
                buffers.append(ptr)
                _check(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, stream))
                context.set_tensor_address(name, ptr)
            for name in self.output_names:
                shape = tuple(context.get_tensor_shape(name))
                host = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = _check(cudart.cudaMallocAsync(max(host.nbytes, 1), stream))
                buffers.append(ptr)
                context.set_tensor_address(name, ptr)
                outputs[name] = (host, ptr)
            if not context.execute_async_v3(stream):
                raise Blip2EdgeError("TensorRT execution failed")
            for host, ptr in outputs.values():
                _check(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, stream))
            _check(cudart.cudaStreamSynchronize(stream))  # the clock is read after this returns
        finally:
            for ptr in buffers:
                cudart.cudaFreeAsync(ptr, stream)
        return {name: host for name, (host, _) in outputs.items()}
