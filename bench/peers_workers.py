"""The engines bench/peers.py compares, one per process: each loads and warms up, answers
{"ready": info} (or {"skip": reason}) on its protocol line, then runs once per "run" line on
stdin and answers one JSON line per run. Library output goes to stderr (fd 1 is redirected),
so only the protocol reaches the parent."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OUT  # noqa: E402

VARIANT_DIRS = {"fp32": "bench-fp32", "uint8+int8": "bench-uint8-int8", "uint8+int4": "bench-uint8-int4"}
# End to end only (its stages are the FP32 visual graphs and the uint8+int4 decoder, compared alone
# already): `quantize --visual none --llm int4`.
E2E_ONLY_DIRS = {"fp32+int4": "bench-fp32-int4"}
STAGES = ("vision", "qformer", "decoder")
PAST = 42  # decoder step measured alone: past length mid-way through 20 tokens after a 33-token prefill
SAMPLE_STRIDE = 37  # outputs sent back for the cosine against ONNX Runtime: every 37th value


# The per-stage comparison's decoder graphs: the concat KV cache form (OpenVINO cannot run ONNX
# Runtime's GroupQueryAttention, which the artifacts' shared form holds), quantized as
# `quantize --llm` quantizes (peers.ensure_artifacts writes them).
CONCAT_DECODERS = {"fp32": None, "uint8+int8": "int8", "uint8+int4": "int4"}


def artifact(variant: str) -> Path:
    return OUT / "artifacts" / {**VARIANT_DIRS, **E2E_ONLY_DIRS}[variant]


def stage_file(variant: str, stage: str) -> Path:
    if stage != "decoder":
        return artifact(variant) / f"{stage}.onnx"
    precision = CONCAT_DECODERS[variant]
    if precision is None:
        return OUT / "artifacts" / "bench-fp32-concat" / "decoder.onnx"
    return OUT / "decoders" / f"concat-{precision}.onnx"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def forced(n: int) -> dict:
    return dict(max_new_tokens=n, min_new_tokens=n)


def hf(args, compiled: bool):
    import torch

    from bench.common import hf_generate_fn
    from exporter.loading import LoadOptions, load_model
    from runtime import synthetic

    torch.set_num_threads(os.cpu_count() or 1)
    model, processor = load_model(str(OUT / "models" / "bench"), LoadOptions())
    if compiled:
        # Each sub-model's forward, dynamic shapes (the KV cache grows every step): generate's
        # Python loop stays eager, as it does in transformers' own torch.compile recipe.
        for m in (model.vision_model, model.qformer, model.language_model):
            m.forward = torch.compile(m.forward, dynamic=True)
    image = synthetic.make_scenes(1, seed=99)[0][1]
    full = hf_generate_fn(model, processor, image, **forced(args.new_tokens))
    one = hf_generate_fn(model, processor, image, **forced(1))
    t0 = time.perf_counter()
    for _ in range(2):
        full(), one()

    def run():
        t0 = time.perf_counter()
        tokens = full()
        t1 = time.perf_counter()
        one()
        # decode per token: (20 tokens - 1 token) / 19, the same prefill and visual stages in both
        return {"total": t1 - t0, "tokens": tokens, "step": (t1 - t0 - (time.perf_counter() - t1)) / (args.new_tokens - 1)}

    return {"warmup_s": time.perf_counter() - t0}, run


def ours(args, variant: str):
    """Our pipeline on `variant` ("fp32", "uint8+int4", ...; "fp32/auto": under --backend auto,
    whose measurement runs here, at load, or is read from the cache)."""
    from runtime import synthetic
    from runtime.pipeline import Blip2Pipeline

    variant, _, backend = variant.partition("/")
    pipe = Blip2Pipeline.from_artifacts(artifact(variant), backend=backend or "onnxruntime")
    image = synthetic.make_scenes(1, seed=99)[0][1]

    def run():
        t0 = time.perf_counter()
        r = pipe.caption([image], stop_strings=(), **forced(args.new_tokens))[0]
        total = time.perf_counter() - t0
        t = r.timings
        return {"total": total, "tokens": [int(x) for x in r.tokens], "vision": t["vision"], "qformer": t["qformer"],
                "prefill": t["prefill"], "step": statistics.median(t["decode_steps"])}

    for _ in range(2):
        run()
    return {"placement": {s: " ".join(str(p[k]) for k in ("engine", "precision") if k in p)
                          for s, p in pipe.artifact.placement.items()}}, run


def stage_feeds(variant: str) -> dict:
    """Seeded inputs, the same in every engine: pixels, image embeddings, one decode step (of
    the concat form's decoder: stage_file)."""
    import numpy as np

    manifest = json.loads((artifact(variant) / "manifest.json").read_text())
    m = manifest["model"]
    rng = np.random.default_rng(0)
    feeds = {"vision": {"pixel_values": rng.standard_normal((1, 3, m["image_size"], m["image_size"]), np.float32)},
             "qformer": {"image_embeds": rng.standard_normal((1, m["num_patches"], m["vision_hidden"]), np.float32)}}
    dec = {"inputs_embeds": rng.standard_normal((1, 1, m["text_hidden"]), np.float32) * 0.1,
           "attention_mask": np.ones((1, PAST + 1), np.int64), "position_ids": np.full((1, 1), PAST, np.int64)}
    for spec in manifest["stages"]["decoder"]["inputs"]:
        if spec["name"].startswith("past_"):
            dec[spec["name"]] = rng.standard_normal((1, m["num_heads"], PAST, m["head_dim"]), np.float32)
    feeds["decoder"] = dec
    return feeds


def stage_runner(engine: str, path: Path):
    """A callable feeds -> first output, for ONNX Runtime as the pipeline runs it or OpenVINO
    (ov-f32, ov-bf16: the precision hint set explicitly and read back)."""
    if engine == "ort":
        from runtime.backends.onnxrt import OrtRunner

        r = OrtRunner(path, ["CPUExecutionProvider"])
        return lambda feeds: r.infer(feeds)[r.output_names[0]]
    import openvino as ov

    precision = engine.removeprefix("ov-")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if got != precision:
        raise RuntimeError(f"asked OpenVINO for {precision}, it compiled {got}")
    req = compiled.create_infer_request()

    def infer(feeds):
        req.infer(feeds)
        return req.get_output_tensor(0).data.copy()

    return infer


def stages(args, engine: str):
    import numpy as np

    from runtime.backends.openvino import cpu_flags, native_precisions

    if engine == "ov-bf16" and "bf16" not in native_precisions(cpu_flags() or frozenset()):
        raise RuntimeError("this CPU has no native bf16 (AVX-512 BF16 or AMX)")
    runners, feeds, skipped, samples = {}, {}, {}, {}
    for variant in VARIANT_DIRS:
        vfeeds = stage_feeds(variant)
        for stage in STAGES:
            key = f"{variant} {stage}"
            try:
                runners[key] = stage_runner(engine, stage_file(variant, stage))
                out = runners[key](vfeeds[stage])
                samples[key] = np.asarray(out, np.float32).ravel()[::SAMPLE_STRIDE].tolist()
                feeds[key] = vfeeds[stage]
            except Exception as exc:  # an engine that cannot read or run a graph: reported, not fatal
                runners.pop(key, None)
                skipped[key] = first_line(exc)
    for key, fn in runners.items():
        fn(feeds[key])

    def run():
        out = {}
        for key, fn in runners.items():
            # idle first: the previous session's ORT threads spin for a while after its runs and
            # would slow this one (the repeats then run back to back, as decode steps do)
            time.sleep(args.stage_pause)
            times = []
            for _ in range(args.stage_reps):
                t0 = time.perf_counter()
                fn(feeds[key])
                times.append(time.perf_counter() - t0)
            out[key] = statistics.median(times)
        return out

    return {"skipped": skipped, "samples": samples}, run


def ct2(args, compute_type: str):
    import ctranslate2

    model = OUT / "ct2" / f"opt-{compute_type}"
    gen = ctranslate2.Generator(str(model), device="cpu", compute_type=compute_type, intra_threads=os.cpu_count() or 1)
    vocab = model / "vocabulary.json"
    tok = json.loads(vocab.read_text()) if vocab.is_file() else (model / "vocabulary.txt").read_text().splitlines()
    # the pipeline's prefill is BOS + 32 query embeddings; CTranslate2 takes tokens: BOS + 32 ids
    prompt = [tok[2]] + [tok[i] for i in range(1000, 1032)]
    n = args.new_tokens

    def run():
        stamps = []
        t0 = time.perf_counter()
        res = gen.generate_batch([prompt], max_length=n, min_length=n, sampling_topk=1, include_prompt_in_result=False,
                                 callback=lambda step: bool(stamps.append(time.perf_counter())))
        total = time.perf_counter() - t0
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"total": total, "step": statistics.median(steps), "tokens": res[0].sequences_ids[0]}

    for _ in range(2):
        run()
    weights = (model / "model.bin").stat().st_size
    return {"weight_bytes": weights, "ct2": ctranslate2.__version__}, run


def prepare_ct2() -> None:
    """The bench checkpoint's OPT language model as a transformers checkpoint, converted to
    CTranslate2 float32 and int8 (once, under bench/out/ct2/)."""
    import ctranslate2

    from exporter.loading import LoadOptions, load_model

    root = OUT / "ct2"
    hf_dir = root / "opt-hf"
    if not (hf_dir / "config.json").is_file():
        model, processor = load_model(str(OUT / "models" / "bench"), LoadOptions())
        model.language_model.save_pretrained(hf_dir)
        processor.tokenizer.save_pretrained(hf_dir)
    # the random bench model's tokenizer has fewer tokens than its embedding table (50272 rows):
    # pad the vocabulary with placeholders, as CTranslate2's OPT loader pads to a multiple of 8
    from ctranslate2.converters import transformers as ct2_hf

    base = ct2_hf.OPTLoader.get_vocabulary

    def padded(self, model, tokenizer):
        tokens = base(self, model, tokenizer)
        return tokens + [f"madeupword{i:05d}" for i in range(model.config.vocab_size - len(tokens))]

    ct2_hf.OPTLoader.get_vocabulary = padded
    for ct, quant in (("float32", None), ("int8", "int8")):
        out = root / f"opt-{ct}"
        if not (out / "model.bin").is_file():
            ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(out), quantization=quant, force=True)


def make(name: str, args):
    kind, _, arg = name.partition(":")
    if kind == "hf":
        return hf(args, compiled=arg == "compile")
    if kind == "ours":
        return ours(args, arg)
    if kind == "stages":
        return stages(args, arg)
    if kind == "ct2":
        return ct2(args, arg)
    raise SystemExit(f"unknown worker {name}")


def serve(name: str, args) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        info, run = make(name, args)
    except Exception as exc:  # the engine is missing or cannot load: the parent skips it
        proto.write(json.dumps({"skip": first_line(exc)}) + "\n")
        return
    proto.write(json.dumps({"ready": info}) + "\n")
    for line in sys.stdin:
        if line.strip() != "run":
            break
        try:
            proto.write(json.dumps(run()) + "\n")
        except Exception as exc:
            proto.write(json.dumps({"error": first_line(exc)}) + "\n")
