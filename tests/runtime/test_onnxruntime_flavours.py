"""ONNX Runtime's flavours (onnxruntime, onnxruntime-gpu, NVIDIA's Jetson wheels) install the same
`onnxruntime/` folder and overwrite each other. The packaging never asks for two (the base install
asks for none, the `cpu` and `gpu` extras for one each), `doctor` fails when two are installed,
and without any the runtime says what to install in one line. Checked on the real pyproject, real
distribution metadata on disk and real interpreters (one that cannot see onnxruntime at all)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from runtime.backends.onnxrt import ORT_DISTRIBUTIONS, flavour_conflict, onnxruntime_distributions
from runtime.doctor.environment import FAIL, PASS, Environment, environment_checks
from runtime.errors import install_command
from tests.conftest import REPO

FLAVOURS = {canonicalize_name(n) for n in ORT_DISTRIBUTIONS}


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def flavours(requirements) -> list[str]:
    return [canonicalize_name(Requirement(r).name) for r in requirements if canonicalize_name(Requirement(r).name) in FLAVOURS]


def test_the_base_install_asks_for_no_onnxruntime_and_each_extra_for_one_flavour_at_most():
    """So `pip install 'blip2-edge[gpu,tensorrt,export]'` never pulls PyPI's CPU wheel beside
    onnxruntime-gpu, and `pip install blip2-edge` after NVIDIA's Jetson wheel keeps it."""
    p = project()
    assert flavours(p["dependencies"]) == []
    extras = p["optional-dependencies"]
    assert flavours(extras["cpu"]) == ["onnxruntime"]
    assert flavours(extras["gpu"]) == ["onnxruntime-gpu"]
    assert {name: flavours(reqs) for name, reqs in extras.items() if name not in ("cpu", "gpu")} == \
        {name: [] for name in extras if name not in ("cpu", "gpu")}


def test_ci_and_the_readme_demo_install_the_cpu_flavour():
    """The README's first lines (demo, tests) keep working: both install the `cpu` extra."""
    def extras(text: str) -> list[set[str]]:  # the extras of each `-e '.[...]'` install in `text`
        return [set(m.split(",")) for m in re.findall(r"-e '\.\[([a-z0-9_,-]+)\]'", text)]

    ci = extras((REPO / ".ci" / "run").read_text())
    assert ci and all({"cpu", "export", "dev"} <= e for e in ci), ci
    demo = next(line for line in (REPO / "README.md").read_text().splitlines() if line.endswith("blip2-edge demo"))
    assert extras(demo) and all("cpu" in e for e in extras(demo)), demo
    pinned = [Requirement(line.split("#")[0]) for line in (REPO / ".ci" / "requirements.txt").read_text().splitlines()
              if line.split("#")[0].strip()]
    assert [str(r.specifier) for r in pinned if canonicalize_name(r.name) in FLAVOURS] == ["==1.32.0"]
    assert [r.name for r in pinned if canonicalize_name(r.name) in FLAVOURS] == ["onnxruntime"]


def dist_info(root: Path, name: str, version: str, top_level: str | None = "onnxruntime") -> None:
    """The metadata pip writes for an installed distribution (what importlib.metadata reads)."""
    d = root / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if top_level is not None:
        (d / "top_level.txt").write_text(top_level + "\n")


def test_distributions_that_ship_onnxruntime_are_found_by_name_or_by_their_top_level_package(tmp_path):
    dist_info(tmp_path, "onnxruntime", "1.32.0")
    dist_info(tmp_path, "onnxruntime-gpu", "1.22.0", top_level=None)  # known by name
    dist_info(tmp_path, "onnxruntime-jetson-build", "1.20.0")  # unknown name, ships onnxruntime/
    dist_info(tmp_path, "onnxruntime-extensions", "0.14.0", top_level="onnxruntime_extensions")
    dist_info(tmp_path, "onnxruntime-genai", "0.8.0", top_level="onnxruntime_genai")
    found = onnxruntime_distributions([str(tmp_path)])
    assert found == [("onnxruntime", "1.32.0"), ("onnxruntime-gpu", "1.22.0"), ("onnxruntime-jetson-build", "1.20.0")]


def test_one_flavour_is_no_conflict_and_two_name_the_fix():
    assert flavour_conflict([("onnxruntime-gpu", "1.22.0")]) is None
    assert flavour_conflict([]) is None
    fix = flavour_conflict([("onnxruntime", "1.32.0"), ("onnxruntime-gpu", "1.22.0")])
    assert "onnxruntime 1.32.0, onnxruntime-gpu 1.22.0" in fix and "\n" not in fix
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in fix and install_command("gpu") in fix and "Jetson" in fix


def env(**kw) -> Environment:
    base = dict(python="3.10.12", platform="Linux aarch64", onnxruntime="1.20.0",
                providers=["CUDAExecutionProvider", "CPUExecutionProvider"], tensorrt=None, cuda_python=None)
    return Environment(**{**base, **kw})


def test_doctor_check_fails_on_two_flavours_and_passes_on_one():
    checks = {c.name: c for c in environment_checks(env(onnxruntime_distributions=[("onnxruntime", "1.32.0"),
                                                                                   ("onnxruntime-gpu", "1.20.0")]))}
    assert checks["onnxruntime"].status == FAIL and "pip uninstall -y onnxruntime onnxruntime-gpu" in checks["onnxruntime"].detail
    checks = {c.name: c for c in environment_checks(env(onnxruntime_distributions=[("onnxruntime-gpu", "1.20.0")]))}
    assert checks["onnxruntime"].status == PASS and "onnxruntime-gpu 1.20.0" in checks["onnxruntime"].detail
    checks = {c.name: c for c in environment_checks(env(onnxruntime=None, providers=[]))}
    assert checks["onnxruntime"].status == FAIL and install_command("cpu") in checks["onnxruntime"].detail


def test_doctor_fails_with_the_fix_when_a_second_flavour_is_installed(tmp_path):
    """A real doctor run in an environment whose metadata says onnxruntime-gpu was installed
    beside this onnxruntime (the state pip leaves: one folder, two owners)."""
    dist_info(tmp_path, "onnxruntime-gpu", "1.20.1")
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "doctor", "--json", "-"], capture_output=True,
                          text=True, cwd=REPO, env=environ, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["onnxruntime"]["status"] == FAIL and "onnxruntime-gpu 1.20.1" in checks["onnxruntime"]["detail"]
    assert proc.stderr.splitlines() == [f"problem: onnxruntime: {checks['onnxruntime']['detail']}"]
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in proc.stderr


@pytest.fixture
def without_onnxruntime(tmp_path) -> list[str]:
    """An interpreter that sees this checkout and the runtime's base dependencies (numpy, Pillow,
    tokenizers, linked from this environment) and no onnxruntime at all: `pip install blip2-edge`
    with no flavour. python -S: no site-packages on its path."""
    import numpy

    installed = Path(numpy.__file__).parents[1]
    site = tmp_path / "site"
    site.mkdir()
    for name in ("numpy", "numpy.libs", "PIL", "pillow.libs", "tokenizers"):
        if (installed / name).exists():
            (site / name).symlink_to(installed / name)
    boot = f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(site)!r}]; from runtime.cli.main import main; sys.exit(main())"
    probe = subprocess.run([sys.executable, "-S", "-c", boot.replace("from runtime.cli.main import main; sys.exit(main())",
                                                                     "import numpy, PIL.Image, tokenizers, onnxruntime")],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and probe.stderr.strip().endswith("No module named 'onnxruntime'"), probe.stderr
    return [sys.executable, "-S", "-c", boot]


def test_without_onnxruntime_caption_says_what_to_install_in_one_line(without_onnxruntime, toy_artifacts, tmp_path):
    from runtime import synthetic

    image = tmp_path / "scene.png"
    synthetic.make_scenes(1, seed=3)[0][1].save(image)
    proc = subprocess.run([*without_onnxruntime, "caption", str(toy_artifacts), str(image)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "ONNX Runtime is not installed" in proc.stderr
    assert install_command("cpu") in proc.stderr and install_command("gpu") in proc.stderr


def test_without_onnxruntime_doctor_fails_naming_what_to_install(without_onnxruntime, tmp_path):
    proc = subprocess.run([*without_onnxruntime, "doctor"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"FAIL  onnxruntime: ONNX Runtime is not installed: {install_command('cpu')}" in proc.stdout
    assert "onnxruntime not installed" in proc.stdout


def test_the_runtime_imports_onnxruntime_only_through_the_backend_helper():
    """One place knows what to say when ONNX Runtime is missing: runtime.backends.onnxrt."""
    import ast

    direct = []
    for path in sorted((REPO / "runtime").rglob("*.py")):
        if path == REPO / "runtime" / "backends" / "onnxrt.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            direct += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names if n.split(".")[0] == "onnxruntime"]
    assert direct == []
