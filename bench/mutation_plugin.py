"""pytest plugin for bench/mutation.py: records the exported-model fixtures once, then replays them.

With MUTATION_CACHE set, the first run copies what `tiny_checkpoint`, `tiny_artifacts` and
`toy_artifacts` built into that directory; later runs hand out the copies instead of exporting
again (an export takes ~30 s; a mutant of the search cannot change what the exporter wrote
because the copies were made from the unmutated code).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CACHED = ("tiny_checkpoint", "tiny_artifacts", "toy_artifacts")


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    cache = os.environ.get("MUTATION_CACHE")
    name = fixturedef.argname
    if not cache or name not in CACHED:
        yield
        return
    saved = Path(cache) / name
    if saved.is_dir():
        # Replay: skip the fixture function (and what it depends on) entirely.
        fixturedef.func = lambda **_: saved
        fixturedef.argnames = ()
        yield
        return
    outcome = yield
    result = outcome.get_result()
    shutil.copytree(result, saved)
