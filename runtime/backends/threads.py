"""One thread policy for every engine a pipeline uses (ONNX Runtime's sessions and OpenVINO's
compiled stages): ThreadSettings, given to each runner by runtime.backends.stage_runners.
Measured in bench/THREADS_RESULTS.md (spinning per stage; threads across engines)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import OptionError

SPIN_MODES = ("auto", "on", "off")
# The stages that run once per token, back to back: their intra-op threads spinning between runs
# saves the wake-up of every step. Every other stage (vision, qformer, T5's encoder and cross_kv)
# runs once per request and hands the cores on to the next stage.
STEP_STAGES = ("decoder",)


@dataclass(frozen=True)
class ThreadSettings:
    """Thread settings per stage, for ONNX Runtime's sessions (intra-op threads, spinning, TF32 on
    CUDA) and OpenVINO's compiled stages (the same thread count, CPU pinning).

    ORT's worker threads keep spinning for a while after a run; the next stage's session then
    competes with them for the cores (bench/THREADS_RESULTS.md: on 2 cores the uint8 Q-Former ran
    ~1.5x slower inside the pipeline than alone). `spin`:
    - "auto" (default): spinning off for the stages that run once per request (vision, qformer,
      encoder), on for the decoder, whose steps follow each other immediately;
    - "on": ORT's own default for every stage; "off": no stage spins.
    `stage_spin` overrides single stages: (("qformer", True),). `intra_op_threads`: threads per
    session, 0 = ORT's default (one per physical core); OpenVINO's stages take the same count
    (INFERENCE_NUM_THREADS), so the two engines share one policy.
    `linger`: under "auto", a spinning stage's threads keep spinning after its run returns (ORT's
    own behaviour). False (default): they spin during a run and stop when it returns
    (session.force_spinning_stop), so the decoder's threads no longer take the cores from the
    next image's vision stage, whichever engine runs it; a decode step is as fast either way
    (bench/THREADS_RESULTS.md, "Threads across engines"). "on" keeps ORT's default throughout.
    `openvino_pinning`: OpenVINO's ENABLE_CPU_PINNING for its CPU stages; None (default):
    OpenVINO's own (pinned on Linux). Pinning off beside ONNX Runtime's stages measured from 6%
    faster to 2% slower end to end in three runs of the same bench: within its noise, so the
    default is left alone; the knob is there to measure it on other machines.
    `tf32`: FP32 matrix products and convolutions on CUDA may use TF32 tensor cores (Ampere and
    newer: faster, inputs rounded to 10-bit mantissas), ONNX Runtime's default. False: full FP32
    (the CUDA provider's use_tf32=0, ONNX Runtime 1.18+), what a token-for-token comparison with
    the CPU needs (doctor, the GPU tests). The CPU, and FP16 graphs' FP16 math, are unaffected.
    """

    spin: str = "auto"
    intra_op_threads: int = 0
    stage_spin: tuple[tuple[str, bool], ...] = ()
    tf32: bool = True
    linger: bool = False
    openvino_pinning: bool | None = None
    # ONNX Runtime CPU sessions that hold one copy of the weights (OrtRunner's low_memory): what
    # export's validation and quantize's reference use for float16 graphs; slower.
    low_memory: bool = False

    def __post_init__(self) -> None:
        if self.spin not in SPIN_MODES:
            raise OptionError(f"unknown spin mode '{self.spin}'; valid: {', '.join(SPIN_MODES)}")
        if isinstance(self.intra_op_threads, bool) or not isinstance(self.intra_op_threads, int) \
                or self.intra_op_threads < 0:
            raise OptionError(f"intra_op_threads must be an integer >= 0 (0: ONNX Runtime's default), "
                              f"got {self.intra_op_threads!r}")
        for item in self.stage_spin:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], bool)):
                raise OptionError(f"stage_spin entries are (stage name, bool) pairs, got {item!r}")
        for name in ("tf32", "linger", "low_memory"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.openvino_pinning is not None and not isinstance(self.openvino_pinning, bool):
            raise OptionError(f"openvino_pinning must be True, False or None, got {self.openvino_pinning!r}")

    def allow_spinning(self, stage: str) -> bool:
        overrides = dict(self.stage_spin)
        if stage in overrides:
            return overrides[stage]
        return self.spin == "on" or (self.spin == "auto" and stage in STEP_STAGES)

    def stop_spinning(self, stage: str) -> bool:
        """Whether a spinning stage's threads stop when its run returns (see `linger`)."""
        return self.spin != "on" and not self.linger and self.allow_spinning(stage)

    def describe(self, stages) -> dict:
        """What the profiler records: the policy and what it gives each stage."""
        return {"spin": self.spin, "intra_op_threads": self.intra_op_threads,
                "allow_spinning": {s: self.allow_spinning(s) for s in stages},
                "stop_spinning_after_run": {s: self.stop_spinning(s) for s in stages}, "tf32": self.tf32,
                "openvino_pinning": self.openvino_pinning}
