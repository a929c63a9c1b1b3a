"""Profile outputs: a terminal table (side by side, ratios to the first), JSON, CSV, and a
Chrome-trace / Perfetto file of one run's stages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from runtime.profiling.profiler import STAGES


def stage_order(profiles: list[dict]) -> list[str]:
    """The stages of all profiles in run order (a T5 directory adds 'encoder' before prefill);
    profiles written before families had no 'stage_order' and have the common STAGES."""
    order: list[str] = []
    for p in profiles:
        own = p.get("stage_order", STAGES)
        for i, s in enumerate(own):
            if s not in order:  # right after the stage that precedes it in its own profile
                order.insert(order.index(own[i - 1]) + 1 if i else 0, s)
    return order


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def table(profiles: list[dict], reference: dict | None = None, stat: str = "mean") -> str:
    """Milliseconds per stage (`stat`: "mean", or "p50" for medians), one column per profile
    (artifact directory, or 'directory [backend]'), then ratios to the first."""
    names = [p.get("label") or Path(p["artifacts"]).name for p in profiles]
    width = max(22, *(len(n) + 2 for n in names))
    title = f"stage ({'mean' if stat == 'mean' else 'median'} ms)"
    lines = [f"{title:<18}" + "".join(f"{n:>{width}}" for n in names)]
    instruct = [n for n, p in zip(names, profiles) if p.get("architecture") == "instructblip"]
    for stage in (*stage_order(profiles), "decode_step", "end_to_end"):
        lines.append(f"{stage:<18}" + "".join(
            f"{_ms(p['stages'][stage][stat] if stage in p['stages'] else None):>{width}}" for p in profiles))
        if stage == "qformer" and instruct:  # it reads the instruction too: not the same work as BLIP-2's
            lines[-1] += f"  (instruction-aware: {', '.join(instruct)})"
    base = profiles[0]["stages"]["end_to_end"][stat]
    lines.append(f"{'p50 / p90 / p99':<18}" + "".join(
        f"{'/'.join(_ms(p['stages']['end_to_end'][k]) for k in ('p50', 'p90', 'p99')):>{width}}" for p in profiles))
    lines.append(f"{'tokens/s':<18}" + "".join(f"{p['tokens_per_s']:>{width}.1f}" for p in profiles))
    lines.append(f"{'images/s':<18}" + "".join(f"{p['images_per_s']:>{width}.2f}" for p in profiles))
    lines.append(f"{'speedup vs 1st':<18}" + "".join(
        f"{base / p['stages']['end_to_end'][stat]:>{width - 1}.2f}x" for p in profiles))
    # ru_maxrss is per process: with several directories in one run it is the peak so far.
    lines.append(f"{'process peak MB':<18}" + "".join(f"{p['peak_rss_mb']:>{width}.0f}" for p in profiles))
    lines.append(f"{'weights MB':<18}" + "".join(f"{p['weights']['total'] / 1e6:>{width}.1f}" for p in profiles
                                                  if "weights" in p))
    lines.append(f"{'KV cache':<18}" + "".join(f"{p.get('kv_cache', 'concat'):>{width}}" for p in profiles))
    if reference:
        ref = reference["end_to_end"]["mean"]
        lines.append(f"\nreference: transformers {reference['mode']} generate, end to end {_ms(ref)} ms "
                     f"(p50 {_ms(reference['end_to_end']['p50'])}); speedup of each directory over it: " +
                     ", ".join(f"{n} x{ref / p['stages']['end_to_end']['mean']:.2f}" for n, p in zip(names, profiles)))
    return "\n".join(lines)


def to_json(path: Path, profiles: list[dict], environment: dict, settings: dict, reference: dict | None,
            tegrastats: dict | None) -> None:
    payload = {"environment": environment, "settings": settings, "profiles": profiles, "reference": reference,
               "tegrastats": tegrastats}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def to_csv(path: Path, profiles: list[dict], environment: dict, reference: dict | None) -> None:
    """One row per (artifacts, stage, statistic); the environment fills the leading columns."""
    env_cols = {f"env_{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in environment.items()}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*env_cols, "artifacts", "stage", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "n"])
        rows = [(p["artifacts"], p["stages"]) for p in profiles]
        if reference:
            rows.append((f"transformers-{reference['mode']}", {"end_to_end": reference["end_to_end"]}))
        for name, stages in rows:
            for stage, s in stages.items():
                values = [None if s[k] is None else round(s[k] * 1e3, 4) for k in ("mean", "p50", "p90", "p99", "min", "max")]
                writer.writerow([*env_cols.values(), name, stage, *values, s["n"]])


def chrome_trace(path: Path, profile: dict) -> None:
    """The first measured run's stages as complete ('X') events on one track, in order; each
    decode step as its own event under 'decode'. Opens in chrome://tracing and Perfetto."""
    run = profile["runs"][0]
    events, t = [], 0.0
    for stage in profile.get("stage_order", STAGES):
        dur = run[stage] * 1e6
        events.append({"name": stage, "cat": "stage", "ph": "X", "ts": t, "dur": dur, "pid": 1, "tid": 1})
        if stage == "decode":
            step_t = t
            for i, step in enumerate(run["decode_steps"]):
                events.append({"name": f"step {i + 1}", "cat": "decode_step", "ph": "X", "ts": step_t,
                               "dur": step * 1e6, "pid": 1, "tid": 2})
                step_t += step * 1e6
        t += dur
    meta = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": Path(profile["artifacts"]).name}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "stages"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "decode steps"}}]
    Path(path).write_text(json.dumps({"traceEvents": meta + events, "displayTimeUnit": "ms"}) + "\n")
