"""TensorRT: engines built on the device from the artifact graphs, and a runner for them.

`tensorrt` and `cuda-python` are imported only inside functions (versions.import_tensorrt /
import_cudart, which check their versions first); the engine manifest, stale detection,
version gates, optimization profiles, shape checks, batch splitting and the context pool are
plain Python, tested on machines without a GPU.
"""
