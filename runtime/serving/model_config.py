"""config.pbtxt of a blip2-edge model for Triton's Python backend (protobuf text format).

Every input is per request of dims [1] under max_batch_size, so a client sends shape [1, 1] (a
batch of one) and Triton's dynamic batcher stacks requests into one execute() call. `image` is
required, `prompt` optional; generation options travel as request parameters (runtime.serving.jobs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from runtime.errors import OptionError


@dataclass(frozen=True)
class BatchingSettings:
    max_batch: int = 8  # Triton's max_batch_size: requests per execute() at most
    max_queue_delay_ms: float = 5.0  # how long the batcher waits to fill a batch
    instances: int = 1  # model instances (one stub process, one pipeline each)
    dynamic: bool = True  # False: every request runs alone (the bench's "off")

    def __post_init__(self) -> None:
        if not (isinstance(self.max_batch, int) and 1 <= self.max_batch <= 1024):
            raise OptionError(f"--max-batch must be an integer in [1, 1024], got {self.max_batch!r}")
        if not (0 <= self.max_queue_delay_ms <= 60_000):
            raise OptionError(f"--max-queue-delay-ms must be in [0, 60000], got {self.max_queue_delay_ms!r}")
        if not (isinstance(self.instances, int) and 1 <= self.instances <= 64):
            raise OptionError(f"--instances must be an integer in [1, 64], got {self.instances!r}")


def quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid protobuf text-format string literal


def _tensor(name: str, dtype: str, dims: str, optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f"  {{ name: {quote(name)} data_type: {dtype} dims: [ {dims} ]{extra} }}"


def python_model_config(name: str, batching: BatchingSettings, params: dict[str, str], stream: bool = False) -> str:
    """The config.pbtxt text of one Python-backend blip2-edge model; `stream`: the decoupled
    streaming variant (text pieces, one request per execute)."""
    inputs = [_tensor("image", "TYPE_STRING", "1")]
    inputs += [_tensor("prompt", "TYPE_STRING", "1", optional=True)]
    outputs = [_tensor("text", "TYPE_STRING", "1")]
    if stream:
        batching = BatchingSettings(max_batch=1, instances=batching.instances, dynamic=False)
    else:
        outputs.append(_tensor("tokens", "TYPE_INT64", "-1"))
    if batching.dynamic:
        delay_us = int(round(batching.max_queue_delay_ms * 1000))
        batch = (f"max_batch_size: {batching.max_batch}\n"
                 f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n")
    else:
        # Batching off: each execute() gets one request (the shape contract stays [1, 1]).
        batch = "max_batch_size: 1\n"
    param_lines = ",\n".join(f"  {{ key: {quote(k)} value: {{ string_value: {quote(v)} }} }}"
                            for k, v in sorted(params.items()))
    return (f"name: {quote(name)}\n"
            'backend: "python"\n'
            f"{batch}"
            "input [\n" + ",\n".join(inputs) + "\n]\n"
            "output [\n" + ",\n".join(outputs) + "\n]\n"
            f"instance_group [ {{ count: {batching.instances} kind: KIND_CPU }} ]\n"
            + ("model_transaction_policy { decoupled: true }\n" if stream else "") +
            "parameters [\n" + param_lines + "\n]\n")
