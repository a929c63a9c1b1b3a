"""The README's demo: export the embedded toy model, quantize it (INT8 visual stages, INT8
weight-only LLM), then caption and question synthetic images with the torch-free runtime on
both, beside the ground truth; then index the same images with the toy retrieval model and
search them by text."""

from __future__ import annotations

from pathlib import Path

from runtime import synthetic

DEMO_SEED = 2024  # not a training seed: these scenes were never seen in training


def _intact(path: Path) -> bool:
    from runtime.artifact.manifest import load_manifest
    from runtime.errors import ArtifactError

    try:
        load_manifest(path)
        return True
    except ArtifactError:
        return False


def ensure_artifacts(out: Path) -> tuple[Path, Path]:
    """FP32 and INT8 toy artifacts under `out`, made unless an intact copy is already there."""
    from calibration.llm import LLMOptions
    from calibration.quantize import QuantizeOptions, quantize
    from exporter.export import ExportOptions, export
    from exporter.toy import CHECKPOINT_DIR

    fp32, int8 = out, out.with_name(out.name + "-int8")
    if _intact(fp32):
        print(f"using {fp32}")
    else:
        export(str(CHECKPOINT_DIR), fp32, ExportOptions(overwrite=True))
    if _intact(int8):
        print(f"using {int8}")
    else:
        print(f"\nquantizing to {int8} (INT8 visual stages from 256 synthetic scenes, INT8 weight-only LLM)")
        quantize(fp32, int8, QuantizeOptions(num_calib=256, llm=LLMOptions(precision="int8"), overwrite=True))
    return fp32, int8


def demo(out: Path, n_images: int) -> int:
    from runtime.pipeline import Blip2Pipeline

    paths = ensure_artifacts(out)
    pipes = {name: Blip2Pipeline.from_artifacts(p) for name, p in zip(("fp32", "int8"), paths)}
    scenes = synthetic.make_scenes(n_images, seed=DEMO_SEED)
    images = [im for _, im in scenes]
    right = {name: 0 for name in pipes}
    total = 0
    print(f"\n{'ground truth':<42} {'FP32 caption':<42} {'INT8 caption':<42} answers (INT8)")
    for name, pipe in pipes.items():
        pipe.caption(images[:1])  # warm-up, so the timings below are steady-state
    results = {name: pipe.caption(images) for name, pipe in pipes.items()}
    answers = {a: pipes["int8"].ask(images, q) for a, q in synthetic.QUESTIONS.items()}
    for i, (scene, _) in enumerate(scenes):
        got = [answers[a][i].text for a in synthetic.QUESTIONS]
        for name in pipes:
            right[name] += results[name][i].text == scene.caption
        total += 1
        print(f"{scene.caption:<42} {results['fp32'][i].text:<42} {results['int8'][i].text:<42} {'/'.join(got)}")
    print()
    for name in pipes:
        t = results[name][0].timings
        print(f"{name}: {right[name]}/{total} captions exact. Batch of {n_images}: vision {t['vision'] * 1e3:.1f} ms, "
              f"qformer {t['qformer'] * 1e3:.1f} ms, prefill {t['prefill'] * 1e3:.1f} ms, "
              f"{len(t['decode_steps'])} decode steps {t['decode'] * 1e3:.1f} ms, total {t['total'] * 1e3:.1f} ms")
    vqa_right = sum(answers[a][i].text == s.answer(a) for a in synthetic.QUESTIONS for i, (s, _) in enumerate(scenes))
    print(f"int8 answers: {vqa_right}/{total * len(synthetic.QUESTIONS)} correct")
    search_demo(out, scenes, pipes["int8"])
    return 0


def search_demo(out: Path, scenes, captioner) -> None:
    """Writes the scenes as PNG files, indexes them with the toy retrieval model (a SQLite file,
    updated incrementally on a rerun) and finds each of three captions among them."""
    from exporter.export import ExportOptions, export
    from exporter.toy import CHECKPOINT_RETRIEVAL_DIR
    from runtime import Blip2Retriever
    from runtime.index import IndexDb, PhotoSearch, update_index

    art, photos, db_path = (out.with_name(out.name + suffix) for suffix in ("-retrieval", "-photos", "-photos.db"))
    if _intact(art):
        print(f"\nusing {art}")
    else:
        print()
        export(str(CHECKPOINT_RETRIEVAL_DIR), art, ExportOptions(overwrite=True))
    photos.mkdir(exist_ok=True)
    truth = {}
    for i, (scene, image) in enumerate(scenes):
        path = photos / f"scene{i:03d}.png"
        if not path.exists():
            image.save(path)
        truth[path.name] = scene.caption
    retriever = Blip2Retriever.from_artifacts(art)
    db = IndexDb.open(db_path, create=True)
    try:
        report = update_index(db, retriever, photos, art)
        print(f"indexed {photos} into {db_path}: {report.embedded} embedded, {report.unchanged} unchanged")
        search = PhotoSearch(db, retriever, art)
        for query in [scene.caption for scene, _ in scenes[:3]]:
            hits = search.search(query, top=3, rerank=8)
            print(f"search {query!r}:")
            top_caption = captioner.caption([hits[0].path])[0].text if hits else ""
            for rank, hit in enumerate(hits):
                name = Path(hit.path).name
                seen = f", captioned '{top_caption}'" if rank == 0 else ""
                print(f"  {rank + 1}. {name}  itc {hit.score:.3f}  itm {hit.itm:.3f}  (truth: '{truth.get(name)}'{seen})")
    finally:
        db.close()
