"""Validation in two passes, so that PyTorch and ONNX Runtime never hold the model side by side.

The families' stage checks read as one pass: compute PyTorch's outputs, run the graph on the same
inputs, compare. During the references pass each stage's runner is a RecordingRunner: `infer`
keeps the feeds and returns a PendingRun, and `compare` / `merge_reports` given one return a
DeferredReport. The export then frees the torch model, and `run_deferred` opens one stage's
session at a time, runs what was recorded for it, closes it, and turns every DeferredReport into
the report the one-pass code would have given (same inputs, same comparison, same tolerances).
"""

from __future__ import annotations

import gc
from typing import Callable


class PendingRun:
    """One recorded run of a stage's graph; its outputs once `run_deferred` has executed it."""

    def __init__(self, stage: str, run: Callable):
        self.stage = stage
        self._run = run
        self._done = False
        self._outputs = None

    def execute(self, runner) -> None:
        if not self._done:
            self._outputs, self._done, self._run = self._run(runner), True, None  # the feeds go with the closure

    @property
    def outputs(self):
        if not self._done:
            raise RuntimeError(f"stage {self.stage}: its recorded run has not been executed")
        return self._outputs

    def __getitem__(self, index) -> "PendingRun":
        """A part of this run's outputs (a run that returns several output dicts, in order)."""
        return _PendingPart(self, index)

    def __iter__(self):
        # __getitem__ alone would make `for x in run` index forever: its length is not known yet.
        raise TypeError(f"stage {self.stage}: a recorded run cannot be iterated; index its parts")


class _PendingPart(PendingRun):
    def __init__(self, whole: PendingRun, index):
        super().__init__(whole.stage, None)
        self.whole, self.index = whole, index

    def execute(self, runner) -> None:
        self.whole.execute(runner)

    @property
    def outputs(self):
        return self.whole.outputs[self.index]


class RecordingRunner:
    """Stands in for a stage's runner during the references pass."""

    def __init__(self, stage: str):
        self.stage = stage

    def infer(self, feeds: dict) -> PendingRun:
        return PendingRun(self.stage, lambda runner: runner.infer(feeds))

    def later(self, run: Callable) -> PendingRun:
        """`run(runner)`, executed with the stage's real runner (the shared KV cache's decoder,
        which drives the session itself)."""
        return PendingRun(self.stage, run)


class DeferredReport:
    """A stage report waiting for the runs it compares: `finish(outputs of each run, in order)`."""

    def __init__(self, runs: list[PendingRun], finish: Callable):
        self.runs, self.finish = runs, finish

    def result(self) -> dict:
        return self.finish(*(r.outputs for r in self.runs))


def deferred(value) -> bool:
    return isinstance(value, (PendingRun, DeferredReport))


def run_deferred(reports: list, stage_order: list[str], open_runner: Callable[[str], object]) -> list[dict]:
    """Executes every recorded run, one stage's session at a time (`open_runner(stage)`), freed
    before the next opens; returns `reports` with each DeferredReport replaced by its result."""
    runs = [r for rep in reports if isinstance(rep, DeferredReport) for r in rep.runs]
    unknown = sorted({r.stage for r in runs} - set(stage_order))
    if unknown:
        raise RuntimeError(f"recorded runs for stages outside the artifact: {', '.join(unknown)}")
    for stage in stage_order:
        mine = [r for r in runs if r.stage == stage]
        if not mine:
            continue
        runner = open_runner(stage)
        for run in mine:
            run.execute(runner)
        del runner
        gc.collect()  # the session's weights go before the next stage's are read
    return [rep.result() if isinstance(rep, DeferredReport) else rep for rep in reports]
