"""The device check's torch part (bench/gpu_check.sh's default mode): what a machine with an
NVIDIA GPU and torch, but without TensorRT or onnxruntime-gpu, can prove about this repository.

    python -m bench.gpu_torch_check --device cuda --json summary.json   # on the GPU machine
    python -m bench.gpu_torch_check --device cpu --quick                # dry run: the same checks on the CPU
    python -m bench.gpu_torch_check --prepare                           # export the fp16 toys to carry there

Checks, each pass / fail / skip with its reason:
  tf32              an FP32 matrix product on the device with TF32 allowed and not, against
                    float64: what TF32 changes (why doctor and the GPU tests turn it off)
  fp16-<llm>-toy    the exporter's torch stage wrappers (exporter/families/: vision, Q-Former,
                    the LLM's stages) of the trained toy, in fp16 on the device against fp32 on
                    the device with TF32 off: every output finite, cosine >= 0.99 per output,
                    the largest fp16 activation against fp16's 65504
  fp16-<llm>-bench  the same at the bench shapes (ViT-B/16, 12-layer Q-Former, OPT-125m / t5-base /
                    a 20-layer LLaMA) with random weights
  fp16-export-<llm> an fp16 artifact's graphs run by ONNX Runtime on the CPU against the same
                    wrappers in fp16 on the device: the export computes what torch computes on a
                    GPU (exported here if onnx is installed, else the one --prepare wrote and the
                    device run carried under bench/.gpu_check/)
T5 is exported in fp32 only (the exporter refuses fp16: its activations overflow in the released
checkpoints); its fp16 rows report the overflow margin and are never failures.

The wrappers read transformers 4.x internals (the exporter pins transformers<5); under another
major version a wrapper that does not run is reported as a skip naming the error, never a pass.

Exit status: 0 when checks ran on the GPU and none failed; 1 when one failed; 3 when nothing was
tested on the GPU (torch without CUDA, every check skipped, or --device cpu).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PREPARED = HERE / ".gpu_check"  # fp16 artifacts exported here, carried to a machine without onnx
MIN_COSINE = 0.99
FP16_MAX = 65504.0
LLMS = ("opt", "t5", "llama")
NOTHING_ON_GPU = "nothing was tested on the GPU"
# What only a user's device proves: the mode `bench/gpu_check.sh --full` runs there.
NEEDS_A_DEVICE = (
    "TensorRT engines built, loaded and compared with the CPU (build-engines, --backend tensorrt)",
    "INT8 engines from 'quantize --target gpu' QDQ graphs",
    "ONNX Runtime's CUDA provider (--device cuda) and TensorRT provider (--backend onnxruntime-trt), "
    "its profiles and engine cache",
    "two TensorRT execution contexts under four threads, closed runners",
    "'blip2-edge doctor DIR' on a GPU, the driver / cuda-python / JetPack checks",
)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


# ---- what the machine has ----------------------------------------------------------------------

# The modules this repository's exporter and runtime import at module level (pyproject's base
# and export dependencies): one missing stops every check that imports them.
MODULES = {"numpy": "numpy", "PIL": "Pillow", "tokenizers": "tokenizers", "safetensors": "safetensors",
           "onnxruntime": "onnxruntime", "torch": "torch", "transformers": "transformers"}
SITE = PREPARED / "site"  # packages carried for the device's Python (gpu_check.sh puts it on PYTHONPATH)


def missing_modules() -> list[str]:
    return [dist for module, dist in MODULES.items() if importlib.util.find_spec(module) is None]


def capabilities() -> list[dict]:
    """One entry per capability the device check depends on: name, whether it is there, detail."""
    missing = missing_modules()
    out = [{"name": "python", "ok": not missing,
            "detail": f"{sys.version.split()[0]}; " + (f"missing {', '.join(missing)}: what imports them cannot run "
                                                       f"(carry them for this Python in {SITE.relative_to(REPO)})"
                                                       if missing else "the runtime's and the exporter's modules import")}]
    try:
        import torch

        if torch.cuda.is_available():
            cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
            detail = f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)} (sm {cc})"
            out.append({"name": "torch-cuda", "ok": True, "detail": detail})
        else:
            out.append({"name": "torch-cuda", "ok": False, "detail": f"torch {torch.__version__} sees no CUDA device"})
    except ImportError:
        out.append({"name": "torch-cuda", "ok": False, "detail": "torch is not installed"})
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        gpu = [p for p in providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
        out.append({"name": "onnxruntime", "ok": True, "gpu": bool(gpu),
                    "detail": f"{ort.__version__}, providers {', '.join(providers)}"
                              + ("" if gpu else " (no CUDA or TensorRT provider: a CPU build)")})
    except ImportError:
        out.append({"name": "onnxruntime", "ok": False, "gpu": False, "detail": "not installed"})
    trt = _version("tensorrt", "tensorrt-cu12", "tensorrt-cu13") or (
        "tensorrt (no pip metadata)" if importlib.util.find_spec("tensorrt") else None)
    out.append({"name": "tensorrt", "ok": trt is not None, "detail": trt or "not installed"})
    cuda = _version("cuda-python", "cuda-bindings")
    note = ""
    if cuda and not cuda.split()[-1].startswith("12."):
        note = " (blip2-edge's TensorRT path takes cuda-python 12.x)"
    out.append({"name": "cuda-python", "ok": cuda is not None, "detail": (cuda or "not installed") + note})
    tf = _version("transformers")
    major = int(tf.split()[-1].split(".")[0]) if tf else None
    out.append({"name": "transformers", "ok": tf is not None,
                "detail": (tf or "not installed") + (" (the exporter's wrappers are written for 4.x: each is tried, "
                                                     "what does not run is reported)" if major and major >= 5 else "")})
    onnx = _version("onnx")
    out.append({"name": "onnx", "ok": onnx is not None,
                "detail": onnx or f"not installed: no export here (a --prepare'd artifact in {PREPARED} is used "
                                  "when carried)"})
    return out


def has(caps: list[dict], name: str) -> bool:
    return any(c["name"] == name and c["ok"] for c in caps)


def print_capabilities(caps: list[dict]) -> None:
    for c in caps:
        print(f"capability {c['name']}: {'yes' if c['ok'] else 'no'} - {c['detail']}", flush=True)


# ---- checks ----------------------------------------------------------------------------------------

class Skip(Exception):
    """A check that could not run here, with the reason."""


def allow_tf32(torch, on: bool) -> None:
    """TF32 in FP32 matrix products and cuDNN convolutions (torch 2.9+'s fp32_precision, else
    the older allow_tf32 flags)."""
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    except AttributeError:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def unsupported_transformers() -> str | None:
    """Why a wrapper that fails may be this transformers' doing, not the wrapper's: the exporter
    is written for 4.x. None under 4.x, where a failure is a failure."""
    tf = _version("transformers")
    if tf and not tf.split()[-1].startswith("4."):
        return f"{tf}, the exporter is written for 4.x (pyproject pins transformers<5)"
    return None


def _could_not(what: str, exc: BaseException) -> Exception:
    """A Skip naming the error under another transformers major; the error itself under 4.x."""
    reason = unsupported_transformers()
    if reason and not isinstance(exc, ModuleNotFoundError):
        return Skip(f"{what} under {reason}: {_one_line(exc)}")
    return exc


def check_tf32(device: str) -> dict:
    import torch

    allow_tf32(torch, False)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=g, dtype=torch.float64), torch.randn(512, 512, generator=g, dtype=torch.float64)
    ref = a @ b
    fa, fb = a.float().to(device), b.float().to(device)

    def rel(x):
        return float((x.double().cpu() - ref).abs().max() / ref.abs().max())

    strict = rel(fa @ fb)
    allow_tf32(torch, True)
    try:
        tf32 = rel(fa @ fb)
    finally:
        allow_tf32(torch, False)
    metrics = {"fp32_rel_error": strict, "tf32_rel_error": tf32}
    if strict > 1e-5:
        return {"status": "fail", "detail": f"FP32 with TF32 off is {strict:.1e} off float64: TF32 is not really off",
                "metrics": metrics}
    seen = "TF32 changes FP32 products by" if tf32 > 10 * max(strict, 1e-9) else "no TF32 effect here:"
    return {"status": "pass", "detail": f"TF32 off: {strict:.1e} relative error; {seen} {tf32:.1e}", "metrics": metrics}


class Activations:
    """Forward hooks on every submodule: the largest |value| any of them output and the first
    that output inf or NaN."""

    def __init__(self, module):
        self.max_abs, self.first_nonfinite = 0.0, None
        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in module.named_modules() if name]

    def _hook(self, name):
        def hook(_module, _inputs, output):
            for t in _tensors(output):
                if t.is_floating_point() and t.numel():
                    m = float(t.detach().abs().amax())
                    if m != m or m == float("inf"):
                        self.first_nonfinite = self.first_nonfinite or name
                    else:
                        self.max_abs = max(self.max_abs, m)
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def load_toy(path: Path, dtype):
    """The toy checkpoint with transformers' own loader (the exporter's fp16 export loads the
    same way: transformers keeps the Q-Former and query tokens in fp32)."""
    import transformers

    from exporter.loading import SUPPORTED_ARCHITECTURES

    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, SUPPORTED_ARCHITECTURES[config.model_type][0])
    return cls.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def random_bench(llm: str, device: str, seed: int = 0):
    """A random-weight BLIP-2 at the bench shapes, built on the device, and its fp16 copy with
    what transformers keeps in fp32 (the model's _keep_in_fp32_modules) kept so."""
    import torch
    import transformers

    from exporter.random_models import build_config

    config = build_config("bench", llm=llm)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    with torch.device(device):
        model32 = transformers.Blip2ForConditionalGeneration(config).eval()
        model32.query_tokens.data.normal_(0, 0.02)
    model16 = copy.deepcopy(model32).half()
    keep = set(getattr(model16, "_keep_in_fp32_modules", None) or ())
    for name, module in model16.named_children():
        if name in keep:
            module.float()
    for name, param in model16.named_parameters(recurse=False):
        if name in keep:
            param.data = param.data.float()
    return model32, model16


def stage_modules(hf_model):
    """(family, dims, stage -> torch module) for the GPU's export form (the concat KV cache)."""
    from exporter.families import export_family

    family = export_family(hf_model.config)
    dims = family.model_dims(hf_model.config)
    kv = family.resolve_kv_cache("concat", "fp16", dims.get("head_dim"))
    if kv is not None:
        dims["kv_cache"] = kv
    return family, dims, family.modules(hf_model, kv)


def _run(module, inputs, device):
    import torch

    with torch.no_grad(), torch.device(device):  # the wrappers' own aranges and masks on the device
        out = module(*[t.to(device) for t in inputs])
    return [o.detach().float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def compare(names, ref: list, got: list) -> tuple[list[str], dict]:
    """Problems (non-finite, low cosine) and per-output metrics of `got` against `ref`."""
    from runtime.doctor.runs import cosine
    from runtime.stages import LOGITS

    problems, metrics = [], {}
    for name, a, b in zip(names, ref, got):
        if a.shape != b.shape:
            problems.append(f"{name}: shape {b.shape} vs {a.shape}")
            continue
        m = {"finite": bool(np.isfinite(b).all()), "max_abs_fp32": float(np.abs(a).max()) if a.size else 0.0}
        if not m["finite"]:
            problems.append(f"{name}: inf/NaN in fp16")
        elif a.size and a.shape[-1]:
            m["cosine"] = round(cosine(a, b), 6)
            if m["cosine"] < MIN_COSINE:
                problems.append(f"{name}: cosine {m['cosine']}")
            if name == LOGITS:
                m["argmax_agreement"] = float((a.argmax(-1) == b.argmax(-1)).mean())
        metrics[name] = m
    return problems, metrics


def check_wrappers(model32, model16, device: str, label: str) -> dict:
    """Every stage wrapper in fp16 against fp32, both on `device`, on the specs' example inputs."""
    import torch

    from runtime.errors import Blip2EdgeError

    allow_tf32(torch, False)
    try:
        family, dims, mods32 = stage_modules(model32)
        _, _, mods16 = stage_modules(model16)
    except Exception as exc:  # noqa: BLE001  (another transformers: its internals moved)
        raise _could_not("the stage wrappers do not build", exc) from exc
    try:
        family.check(model32.config, label, "fp16")
        exported_fp16 = True
    except Blip2EdgeError:
        exported_fp16 = False  # T5: fp32 only; its fp16 numbers are what that refusal rests on
    torch.manual_seed(0)
    examples = family.example_inputs(model32, dims)  # fp32, on the CPU
    specs = family.runtime.stage_specs(dims)
    stages, problems, worst = {}, [], {"max_abs": 0.0, "nonfinite_at": None}
    for stage, inputs in examples.items():
        half = [t.half() if t.dtype == torch.float32 else t for t in inputs]
        try:
            ref = _run(mods32[stage], inputs, device)
            watch = Activations(mods16[stage])
            try:
                got = _run(mods16[stage], half, device)
            finally:
                watch.close()
        except Exception as exc:  # noqa: BLE001
            raise _could_not(f"stage {stage} does not run on {device}", exc) from exc
        found, metrics = compare([t.name for t in specs[stage].outputs], ref, got)
        stages[stage] = {"outputs": metrics, "max_abs_fp16": watch.max_abs, "first_nonfinite": watch.first_nonfinite}
        worst["max_abs"] = max(worst["max_abs"], watch.max_abs)
        worst["nonfinite_at"] = worst["nonfinite_at"] or (watch.first_nonfinite and f"{stage}.{watch.first_nonfinite}")
        problems += [f"{stage} {p}" for p in found]
    headroom = FP16_MAX / worst["max_abs"] if worst["max_abs"] else float("inf")
    summary = (f"stages {', '.join(stages)}; largest fp16 activation {worst['max_abs']:.4g} "
               f"({headroom:.3g}x below fp16's 65504)")
    metrics = {"stages": stages, "fp16_exported": exported_fp16, "headroom": headroom}
    if not problems:
        return {"status": "pass", "detail": f"fp16 agrees with fp32 (cosine >= {MIN_COSINE}, finite): {summary}",
                "metrics": metrics}
    where = f"; first inf/NaN at {worst['nonfinite_at']}" if worst["nonfinite_at"] else ""
    if not exported_fp16:
        return {"status": "pass", "detail": f"fp16 differs ({'; '.join(problems[:3])}{where}), as the exporter's "
                                            f"refusal of fp16 for this family says: {summary}", "metrics": metrics}
    return {"status": "fail", "detail": f"{'; '.join(problems[:4])}{where}: {summary}", "metrics": metrics}


def toy_checkpoints() -> dict[str, Path]:
    from exporter.toy import CHECKPOINTS, INSTRUCTBLIP_CHECKPOINT

    return {**CHECKPOINTS, "llama": INSTRUCTBLIP_CHECKPOINT}


def check_toy(llm: str, device: str) -> dict:
    import torch

    path = toy_checkpoints()[llm]
    try:
        model32 = load_toy(path, torch.float32).to(device)
        model16 = load_toy(path, torch.float16).to(device)
    except Exception as exc:  # noqa: BLE001
        raise _could_not("the toy checkpoint does not load", exc) from exc
    return check_wrappers(model32, model16, device, f"the {llm} toy")


def check_bench(llm: str, device: str) -> dict:
    try:
        model32, model16 = random_bench(llm, device)
    except Exception as exc:  # noqa: BLE001
        raise _could_not("the bench-shaped model does not build", exc) from exc
    return check_wrappers(model32, model16, device, f"a bench-shaped {llm}")


# ---- an fp16 export against the wrappers on the device -------------------------------------------

EXPORTABLE_FP16 = ("opt", "llama")  # T5: the exporter refuses fp16


def prepare(out: Path, llms=EXPORTABLE_FP16, log=print) -> list[Path]:
    """Exports the fp16 toys (the GPU's concat KV cache) into `out`/<llm>, to carry to a machine
    that has no onnx."""
    from exporter.export import ExportOptions, export
    from exporter.loading import LoadOptions

    written = []
    for llm in llms:
        target = out / llm
        export(str(toy_checkpoints()[llm]), target, ExportOptions(load=LoadOptions(dtype="fp16"), kv_cache="concat",
                                                                  overwrite=True), log=lambda s: None)
        log(f"prepared {target}")
        written.append(target)
    return written


def fp16_artifact(llm: str, work: Path) -> tuple[Path, str]:
    """A carried (--prepare'd) fp16 artifact of the toy, else one exported now when onnx is here."""
    carried = PREPARED / llm
    if (carried / "manifest.json").is_file():
        return carried, f"carried in {carried}"
    if importlib.util.find_spec("onnx") is None:
        raise Skip(f"no onnx here to export with, and no artifact carried: run 'python -m bench.gpu_torch_check "
                   f"--prepare' where onnx is, and carry {PREPARED.relative_to(REPO)}")
    try:
        return prepare(work, (llm,), log=lambda s: None)[0], "exported here"
    except Exception as exc:  # noqa: BLE001
        raise _could_not("the fp16 export does not run", exc) from exc


def check_fp16_export(llm: str, device: str, work: Path) -> dict:
    """The artifact's graphs on ONNX Runtime's CPU provider against the wrappers in fp16 on the
    device, on the same inputs; the embedding table shows the artifact is this checkpoint's."""
    import torch

    from runtime.artifact.manifest import load_manifest
    from runtime.backends.onnxrt import OrtRunner

    art, origin = fp16_artifact(llm, work)
    manifest = load_manifest(art, verify=True)
    try:
        model16 = load_toy(toy_checkpoints()[llm], torch.float16).to(device)
        family, _, mods16 = stage_modules(model16)
    except Exception as exc:  # noqa: BLE001
        raise _could_not("the toy's fp16 wrappers do not build", exc) from exc
    table = np.load(manifest.path(manifest.data["embeddings"]["file"], "embeddings.file"))
    if not np.array_equal(table, model16.get_input_embeddings().weight.detach().cpu().numpy()):
        return {"status": "fail", "detail": f"{art} is not an fp16 export of the {llm} toy (its embedding table differs)"}
    dims = manifest.data["model"]
    torch.manual_seed(0)
    examples = family.example_inputs(model16, dims)
    specs = family.runtime.stage_specs(dims)
    problems, metrics = [], {}
    for stage, inputs in examples.items():
        runner = OrtRunner(manifest.stage_file(stage), ["CPUExecutionProvider"])
        feeds = {t.name: x.cpu().numpy() for t, x in zip(specs[stage].inputs, inputs)}
        onnx_out = runner.infer(feeds)
        names = [t.name for t in specs[stage].outputs]
        try:
            got = _run(mods16[stage], inputs, device)
        except Exception as exc:  # noqa: BLE001
            raise _could_not(f"stage {stage} does not run on {device}", exc) from exc
        found, m = compare(names, [onnx_out[n].astype(np.float32) for n in names], got)
        metrics[stage] = m
        problems += [f"{stage} {p}" for p in found]
    detail = f"{origin}; stages {', '.join(metrics)}"
    if problems:
        return {"status": "fail", "detail": f"{'; '.join(problems[:4])} ({detail})", "metrics": metrics}
    return {"status": "pass", "detail": f"ONNX Runtime (CPU) on the fp16 graphs agrees with torch fp16 on {device} "
                                        f"(cosine >= {MIN_COSINE}): {detail}", "metrics": metrics}


# ---- the run -------------------------------------------------------------------------------------

# A measurement of the machine, not a test of this repository: it never makes a run count as
# "tested on the GPU".
MEASUREMENTS = ("tf32",)


def plan(quick: bool) -> list[tuple[str, object]]:
    """(name, fn(device, work) -> result) in order; --quick: the toys only."""
    checks = [("tf32", lambda device, work: check_tf32(device))]
    checks += [(f"fp16-{llm}-toy", lambda device, work, llm=llm: check_toy(llm, device)) for llm in LLMS]
    checks += [(f"fp16-export-{llm}", lambda device, work, llm=llm: check_fp16_export(llm, device, work))
               for llm in EXPORTABLE_FP16]
    if not quick:
        checks += [(f"fp16-{llm}-bench", lambda device, work, llm=llm: check_bench(llm, device)) for llm in LLMS]
    return checks


def run_checks(device: str, work: Path, quick: bool, budget_s: float, log=print) -> list[dict]:
    start = time.monotonic()
    results = []
    for name, fn in plan(quick):
        t0 = time.monotonic()
        if t0 - start > budget_s:
            result = {"status": "skip", "detail": f"out of time (budget {budget_s:.0f}s)"}
        else:
            try:
                result = fn(device, work)
            except Skip as exc:
                result = {"status": "skip", "detail": str(exc)}
            except ModuleNotFoundError as exc:  # a package this machine lacks, not a fault of the code
                result = {"status": "skip", "detail": f"needs the '{exc.name}' module, not installed here (carry it "
                                                      f"for this Python in {SITE.relative_to(REPO)})"}
            except Exception as exc:  # noqa: BLE001  (a crash is a failure with its line, the traceback in the log)
                traceback.print_exc()
                result = {"status": "fail", "detail": f"crashed: {_one_line(exc)}"}
        result = {"name": name, "device": device, "seconds": round(time.monotonic() - t0, 1), **result}
        log(f"{result['status'].upper():<5} {name} [{device}, {result['seconds']}s]: {result['detail']}")
        results.append(result)
    return results


def verdict(device: str, results: list[dict]) -> tuple[int, str]:
    """(exit status, closing line)."""
    failed = [r["name"] for r in results if r["status"] == "fail"]
    on_gpu = [r["name"] for r in results
              if r["status"] == "pass" and r["device"] == "cuda" and r["name"] not in MEASUREMENTS]
    if failed:
        return 1, f"failed: {', '.join(failed)}"
    if not on_gpu:
        why = "dry run on the CPU" if device == "cpu" else "every check of this repository was skipped"
        return 3, f"{NOTHING_ON_GPU} ({why})"
    return 0, f"passed on the GPU: {', '.join(on_gpu)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (default); cpu: a dry run of the same checks, which never counts as a GPU test")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--work", type=Path, help="working directory for exports (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="the toys only, not the bench shapes")
    ap.add_argument("--budget", type=float, default=420.0, metavar="S", help="checks not started by then are skipped")
    ap.add_argument("--capabilities", action="store_true", help="print what the machine has, then stop")
    ap.add_argument("--prepare", action="store_true", help=f"export the fp16 toys into {PREPARED} (to carry), then stop")
    args = ap.parse_args(argv)
    caps = capabilities()
    print_capabilities(caps)
    if args.capabilities:
        return 0
    if args.prepare:
        prepare(PREPARED)
        return 0
    import tempfile

    device = args.device
    if device == "cuda" and not has(caps, "torch-cuda"):
        results = [{"name": name, "device": device, "seconds": 0.0, "status": "skip", "detail": "torch has no CUDA here"}
                   for name, _ in plan(args.quick)]
        for r in results:
            print(f"SKIP  {r['name']}: {r['detail']}")
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-torch-check-") as tmp:
            results = run_checks(device, args.work or Path(tmp), args.quick, args.budget)
    status, line = verdict(device, results)
    print("not proven here (needs a device with TensorRT and onnxruntime-gpu: bench/gpu_check.sh --full):")
    for item in NEEDS_A_DEVICE:
        print(f"  - {item}")
    print(f"gpu_torch_check: {line}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "capabilities": caps, "checks": results, "exit": status,
                                         "verdict": line, "not_proven": list(NEEDS_A_DEVICE)}, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
