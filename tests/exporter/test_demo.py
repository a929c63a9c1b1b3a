"""The README's first command: `blip2-edge demo` end to end (export, quantize, caption, ask,
index and search), and again on its own output (nothing re-made, nothing re-embedded)."""

import re

from tests.conftest import run_cli


def test_demo_captions_answers_and_finds_each_queried_scene(tmp_path):
    out = tmp_path / "toy"
    first = run_cli("demo", "--out", str(out), "--images", "4")
    assert first.returncode == 0, first.stderr
    assert re.search(r"int8: [34]/4 captions exact", first.stdout), first.stdout
    assert "indexed" in first.stdout and "4 embedded, 0 unchanged" in first.stdout
    searches = re.findall(r"search '([^']*)':\n  1\. \S+ .*\(truth: '([^']*)'", first.stdout)
    assert len(searches) == 3 and all(query == truth for query, truth in searches), first.stdout

    again = run_cli("demo", "--out", str(out), "--images", "4")
    assert again.returncode == 0, again.stderr
    assert f"using {out}" in again.stdout and "0 embedded, 4 unchanged" in again.stdout
