"""The README's demo: export the embedded toy model, then caption and question synthetic images
with the torch-free runtime and print the answers beside the ground truth."""

from __future__ import annotations

from pathlib import Path

from runtime import synthetic

DEMO_SEED = 2024  # not a training seed: these scenes were never seen in training


def ensure_artifacts(out: Path) -> None:
    """Exports the toy model to `out` unless a complete, intact export is already there."""
    from exporter.export import ExportOptions, export
    from exporter.toy import CHECKPOINT_DIR
    from runtime.errors import ArtifactError
    from runtime.manifest import load_manifest

    if out.exists():
        try:
            load_manifest(out)
            print(f"using the toy artifacts in {out}")
            return
        except ArtifactError as exc:
            print(f"re-exporting: {exc}")
    export(str(CHECKPOINT_DIR), out, ExportOptions(overwrite=True))


def demo(out: Path, n_images: int) -> int:
    from runtime.pipeline import Blip2Pipeline

    ensure_artifacts(out)
    pipe = Blip2Pipeline.from_artifacts(out)
    scenes = synthetic.make_scenes(n_images, seed=DEMO_SEED)
    images = [im for _, im in scenes]
    captions = pipe.caption(images)
    answers = {a: pipe.ask(images, q) for a, q in synthetic.QUESTIONS.items()}
    right = total = 0
    print(f"\n{'caption (runtime)':<40} {'ground truth':<40} answers colour/size/where/pattern")
    for i, (scene, _) in enumerate(scenes):
        ok = captions[i].text == scene.caption
        got = [answers[a][i].text for a in synthetic.QUESTIONS]
        want = [scene.answer(a) for a in synthetic.QUESTIONS]
        right += ok + sum(g == w for g, w in zip(got, want))
        total += 1 + len(want)
        print(f"{captions[i].text:<40} {scene.caption:<40} {'/'.join(got)} {'ok' if ok and got == want else 'MISS'}")
    t = captions[0].timings
    print(f"\n{right}/{total} correct. Caption batch of {n_images}: vision {t['vision'] * 1e3:.1f} ms, "
          f"qformer {t['qformer'] * 1e3:.1f} ms, prefill {t['prefill'] * 1e3:.1f} ms, "
          f"{len(t['decode_steps'])} decode steps {t['decode'] * 1e3:.1f} ms, total {t['total'] * 1e3:.1f} ms")
    return 0
