"""TensorRT: engines built on the device from the artifact graphs, and a runner for them.

`tensorrt` and `cuda-python` are imported only inside builder.py and runner.py; the engine
manifest, stale detection, cache keys and optimization profiles are plain Python (and tested
on machines without a GPU).
"""
