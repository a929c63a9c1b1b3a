"""Mutation testing for small modules: AST-level mutants, each run against the given tests.

    python bench/mutation.py runtime/generation/search.py runtime/generation/logits.py --tests tests/runtime/test_search.py

mutmut 3 copies the project into `mutants/` and needs its tests to import the trampolined copy;
here the session fixtures export ONNX models and the CLI tests run subprocesses, so this script
instead: copies the repository once to a scratch directory (the shared working tree is never
modified), applies one mutation at a time there, and runs pytest in a fork of a warm interpreter
(torch and transformers already imported; `--no-fork` for a fresh one) with a timeout, one mutant
at a time under /tmp/blip2-heavy.lock. The exported-model fixtures are built once and replayed
(see `mutation_plugin.py`), so a mutant costs the tests themselves. `--sample N` spreads N
mutants over each file for a quick score; `--from-git REV` scores an older tree (a baseline).

Mutations: comparison swaps (< <=, > >=, == !=, in / not in, is / is not), arithmetic swaps
(+ -, * /, // /, ** *), `and`/`or`, dropping `not` and unary minus, integer constants +1,
float constants +0.5, True/False, `return X` -> `return None`. Docstrings and annotations are
not mutated. A mutant is killed when the tests fail or time out.
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = "/tmp/blip2-heavy.lock"
FORK = True

CMP_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BIN_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
             ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}


class Mutator(ast.NodeTransformer):
    """Counts mutation points in source order; with `target` set, applies that one only."""

    def __init__(self, target: int | None = None):
        self.target = target
        self.count = 0
        self.points: list[tuple[int, str]] = []  # (line, description)

    def _hit(self, node: ast.AST, what: str) -> bool:
        i = self.count
        self.count += 1
        self.points.append((getattr(node, "lineno", 0), what))
        return i == self.target

    # -- skip what does not run: docstrings, annotations --------------------------------------
    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        start = 1 if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str) else 0
        return body[:start] + [self.visit(s) for s in body[start:]]

    def visit_Module(self, node):
        node.body = self._body(node.body)
        return node

    def visit_FunctionDef(self, node):
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [self.visit(d) if d is not None else None for d in node.args.kw_defaults]
        node.body = self._body(node.body)
        return node

    def visit_ClassDef(self, node):
        node.body = self._body(node.body)
        return node

    def visit_AnnAssign(self, node):
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_ImportFrom(self, node):
        return node

    # -- mutations ----------------------------------------------------------------------------
    def visit_Compare(self, node):
        self.generic_visit(node)
        for j, op in enumerate(node.ops):
            new = CMP_SWAPS.get(type(op))
            if new and self._hit(node, f"{type(op).__name__} -> {new.__name__}"):
                node.ops[j] = new()
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        new = BIN_SWAPS.get(type(node.op))
        if new and self._hit(node, f"{type(node.op).__name__} -> {new.__name__}"):
            node.op = new()
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._hit(node, f"{type(node.op).__name__} -> {new.__name__}"):
            node.op = new()
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, (ast.Not, ast.USub)) and self._hit(node, f"drop {type(node.op).__name__}"):
            return node.operand
        return node

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            if self._hit(node, f"{v} -> {not v}"):
                return ast.copy_location(ast.Constant(not v), node)
        elif isinstance(v, int):
            if self._hit(node, f"{v} -> {v + 1}"):
                return ast.copy_location(ast.Constant(v + 1), node)
        elif isinstance(v, float):
            if self._hit(node, f"{v} -> {v + 0.5}"):
                return ast.copy_location(ast.Constant(v + 0.5), node)
        return node

    def visit_Return(self, node):
        self.generic_visit(node)
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            if self._hit(node, "return None"):
                node.value = ast.Constant(None)
        return node


def mutants(source: str) -> list[tuple[int, str]]:
    m = Mutator()
    m.visit(ast.parse(source))
    return m.points


def mutate(source: str, index: int) -> str:
    tree = Mutator(index).visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree))


def copy_repo(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "out", "__pycache__", "*.onnx", "*.onnx.data", "mutants",
                                    ".pytest_cache")
    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)  # keeps the committed toy checkpoint


def run_tests(root: Path, tests: list[str], timeout: float, env: dict) -> tuple[bool, float]:
    """True when the tests pass."""
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one heavy job at a time on a shared machine, per mutant
        return _run_tests(root, tests, timeout, env)


PYTEST_ARGS = ["-x", "-q", "-p", "bench.mutation_plugin", "--no-header", "-p", "no:cacheprovider"]
# Imported once by the parent so that each forked test run starts warm (never `runtime`,
# `exporter` or `tests`: those must come from the mutated copy).
WARM = ("numpy", "torch", "transformers", "transformers.generation", "onnxruntime", "tokenizers", "PIL.Image",
        "pytest")


def _run_tests(root: Path, tests: list[str], timeout: float, env: dict) -> tuple[bool, float]:
    t0 = time.perf_counter()
    if not FORK:
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests], cwd=root, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        return ok, time.perf_counter() - t0
    pid = os.fork()
    if pid == 0:  # the child: a fresh pytest session over the copy, in this warm interpreter
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(root)
            os.environ.clear()
            os.environ.update(env)
            sys.path.insert(0, str(root))
            import pytest

            code = int(pytest.main([*PYTEST_ARGS, *tests]))
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0, time.perf_counter() - t0
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return False, time.perf_counter() - t0
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("targets", nargs="+", help="module files to mutate")
    ap.add_argument("--tests", nargs="+", required=True, help="test files (or node ids) that should kill them")
    ap.add_argument("--from-git", metavar="REV",
                    help="test the tree as of this git revision (a baseline) instead of the working tree")
    ap.add_argument("--json", help="write every mutant's outcome here")
    ap.add_argument("-k", dest="select", help="pytest -k expression (e.g. to leave out subprocess tests)")
    ap.add_argument("--no-fork", action="store_true",
                    help="run each mutant's tests in a new interpreter instead of a fork of a warm one")
    ap.add_argument("--fixtures", metavar="DIR",
                    help="where the exported-model fixtures are recorded and replayed (default: a scratch dir)")
    ap.add_argument("--sample", type=int, metavar="N", help="run N mutants per file, evenly spread (a quick score)")
    args = ap.parse_args(argv)
    targets, tests = args.targets, args.tests
    if args.select:
        tests = [*tests, "-k", args.select]
    global FORK
    FORK = not args.no_fork
    sys.dont_write_bytecode = True  # a mutant of the same size and mtime must not load a stale .pyc
    if FORK:
        import importlib

        for name in WARM:
            importlib.import_module(name)

    work = Path(tempfile.mkdtemp(prefix="mutation-"))
    root = work / "repo"
    if args.from_git:  # the whole tree as of REV: its modules and its tests
        root.mkdir()
        archive = subprocess.run(["git", "archive", args.from_git], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
        shutil.copy(Path(__file__), root / "bench")
        shutil.copy(Path(__file__).with_name("mutation_plugin.py"), root / "bench")
    else:
        copy_repo(root)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MUTATION_CACHE=args.fixtures or str(work / "fixtures"))
    originals = {}
    for t in targets:
        originals[t] = (root / t).read_text()

    ok, base = run_tests(root, tests, timeout=3600, env=env)  # also records the fixtures
    if not ok:
        print(f"the tests fail on the unmutated code (in {root}); fix that first", file=sys.stderr)
        return 1
    if not args.fixtures:
        ok, base = run_tests(root, tests, timeout=3600, env=env)  # replaying the fixtures: the real cost
    timeout = 3 * base + 30
    print(f"baseline {base:.1f}s; per-mutant timeout {timeout:.0f}s", flush=True)

    outcomes, survivors = [], []
    for t in targets:
        points = list(enumerate(mutants(originals[t])))
        if args.sample and args.sample < len(points):
            points = [points[round(k * len(points) / args.sample)] for k in range(args.sample)]
        for i, (line, what) in points:
            (root / t).write_text(mutate(originals[t], i))
            passed, secs = run_tests(root, tests, timeout, env)
            outcomes.append(dict(file=t, index=i, line=line, mutation=what, killed=not passed,
                                 seconds=round(secs, 1)))
            if passed:
                survivors.append(f"{t}:{line}: {what}")
            print(f"{t}:{line} #{i} {what}: {'SURVIVED' if passed else 'killed'} ({secs:.0f}s)", flush=True)
        (root / t).write_text(originals[t])
    total = len(outcomes)
    dead = total - len(survivors)
    print(f"\nscore: {dead}/{total} killed ({100 * dead / max(total, 1):.0f}%)")
    for s in survivors:
        print("survived:", s)
    if args.json:
        Path(args.json).write_text(json.dumps(outcomes, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
