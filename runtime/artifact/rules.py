"""The rules manifest.json is checked with (runtime/artifact/schema.py holds the tables that use
them): each rule knows the field path it checks (`stages.vision.inputs[0].shape[2]`) and raises
its first violation as one Invalid line that names the path and says what was expected."""

from __future__ import annotations

import json
import math
import re
import string
from typing import Callable

from runtime.artifact.confinement import path_problem

FLOAT_DTYPES = ("float16", "float32")
TENSOR_DTYPES = ("float16", "float32", "int64", "int32", "int8", "uint8", "bool")
RESAMPLES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # runtime.preprocess.RESAMPLE
MAX_IMAGE_SIDE = 4096
MAX_TEXT = 4096  # characters of a prompt template or stop string
MAX_IDS = 64  # prefix/suffix/eos token ids
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Invalid(Exception):
    """One rule broken: `field` (a path such as stages.vision.file) and what was expected."""

    def __init__(self, field: str, expected: str, value=None, show_value: bool = True):
        got = f", got {_show(value)}" if show_value else ""
        super().__init__(f"{field}: expected {expected}{got}")

    @classmethod
    def path(cls, field: str, value, problem: str) -> "Invalid":
        """The wording of runtime.artifact.confinement, so a path is refused in the same words wherever."""
        error = cls.__new__(cls)
        Exception.__init__(error, f"{field} = {repr(value)[:80]}: {problem}")
        return error


def _show(value) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


class Context:
    """What a rule may look at besides its value: the whole manifest, and the paths it collects."""

    def __init__(self, root: dict):
        self.root = root
        self.paths: list[tuple[str, str]] = []  # (field, relative path) of every file the runtime loads


# ---- rules -----------------------------------------------------------------------------------


class Rule:
    def check(self, value, field: str, ctx: Context) -> None:
        raise NotImplementedError


class Int(Rule):
    def __init__(self, lo: int = 0, hi: int | Callable[[Context], int] = 2**31 - 1):
        self.lo, self.hi = lo, hi

    def check(self, value, field, ctx):
        hi = self.hi(ctx) if callable(self.hi) else self.hi
        if not isinstance(value, int) or isinstance(value, bool) or not self.lo <= value <= hi:
            raise Invalid(field, f"an integer in [{self.lo}, {hi}]", value)


class Num(Rule):
    """A finite number; `positive` excludes zero and below."""

    def __init__(self, positive: bool = False, bound: float = 1e6):
        self.positive, self.bound = positive, bound

    def check(self, value, field, ctx):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or abs(value) > self.bound or (self.positive and value <= 0):
            raise Invalid(field, f"a finite number{' > 0' if self.positive else ''} within +-{self.bound:g}", value)


class Str(Rule):
    def __init__(self, choices=None, nonempty: bool = False, max_len: int = MAX_TEXT, pattern=None):
        self.choices, self.nonempty, self.max_len, self.pattern = choices, nonempty, max_len, pattern

    def check(self, value, field, ctx):
        if self.choices is not None:
            if not isinstance(value, str) or value not in self.choices:
                raise Invalid(field, f"one of {', '.join(sorted(self.choices))}", value)
        elif not isinstance(value, str) or len(value) > self.max_len or (self.nonempty and not value):
            raise Invalid(field, f"a {'non-empty ' if self.nonempty else ''}string of at most {self.max_len} characters",
                          value)
        elif self.pattern is not None and not self.pattern.fullmatch(value):
            raise Invalid(field, f"a string matching {self.pattern.pattern}", value)


class Const(Rule):
    def __init__(self, value):
        self.value = value

    def check(self, value, field, ctx):
        if value != self.value or type(value) is not type(self.value):
            raise Invalid(field, json.dumps(self.value), value)


class Bool(Rule):
    def check(self, value, field, ctx):
        if not isinstance(value, bool):
            raise Invalid(field, "true or false", value)


class Template(Rule):
    """A prompt template filled with str.format(one argument): at most one bare `{}` (or `{0}`),
    no attribute lookups, indexing, conversions or format specs in it."""

    def check(self, value, field, ctx):
        Str().check(value, field, ctx)
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
        except ValueError:
            fields = None
        if fields is None or len(fields) > 1 or any(f not in (("", "", None), ("0", "", None)) for f in fields):
            raise Invalid(field, "a template with at most one '{}' placeholder", value)


class RelPath(Rule):
    """A path relative to the artifact directory; `loaded` ones are recorded for the integrity
    check (each must be listed in files{}). Where it resolves is checked by Manifest.path."""

    def __init__(self, loaded: bool = True):
        self.loaded = loaded

    def check(self, value, field, ctx):
        problem = path_problem(value)
        if problem:
            raise Invalid.path(field, value, problem)
        if self.loaded:
            ctx.paths.append((field, value))


class ListOf(Rule):
    def __init__(self, item: Rule, min_len: int = 0, max_len: int = 4096):
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def check(self, value, field, ctx):
        if not isinstance(value, list) or not self.min_len <= len(value) <= self.max_len:
            size = f"{self.min_len}" if self.min_len == self.max_len else f"{self.min_len} to {self.max_len}"
            raise Invalid(field, f"a list of {size} items", value)
        for i, item in enumerate(value):
            self.item.check(item, f"{field}[{i}]", ctx)


class Obj(Rule):
    """An object with required and optional keys; other keys are allowed (newer writers)."""

    def __init__(self, required: dict[str, Rule] | None = None, optional: dict[str, Rule] | None = None):
        self.required, self.optional = required or {}, optional or {}

    def check(self, value, field, ctx):
        if not isinstance(value, dict):
            raise Invalid(field, "an object", value)
        for key, rule in self.required.items():
            if key not in value:
                raise Invalid(_join(field, key), "a value (required key is missing)", show_value=False)
            rule.check(value[key], _join(field, key), ctx)
        for key, rule in self.optional.items():
            if key in value:
                rule.check(value[key], _join(field, key), ctx)


class Nullable(Rule):
    def __init__(self, rule: Rule):
        self.rule = rule

    def check(self, value, field, ctx):
        if value is not None:
            self.rule.check(value, field, ctx)


class Files(Rule):
    """files{}: relative path -> lowercase hex sha256."""

    def check(self, value, field, ctx):
        if not isinstance(value, dict):
            raise Invalid(field, "an object mapping relative paths to sha256 digests", value)
        for rel, digest in value.items():
            RelPath(loaded=False).check(rel, f"{field}[{rel!r}]", ctx)
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise Invalid(f"{field}[{rel!r}]", "a sha256 digest (64 lowercase hex digits)", digest)


class Dim(Rule):
    """One dim of a tensor shape: a fixed size, or the name of a symbolic dim."""

    def check(self, value, field, ctx):
        fixed = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31
        if not fixed and not (isinstance(value, str) and _SYMBOL.fullmatch(value)):
            raise Invalid(field, "a non-negative integer or a symbolic dim name", value)


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key
