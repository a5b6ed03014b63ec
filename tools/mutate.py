"""Mutation testing of the core modules: plant small bugs one at a time, run the tests that cover each,
and report the mutants that no test catches.

    python tools/mutate.py --jobs 2                   # the default sample (see docs/testing.md)
    python tools/mutate.py --list                     # the sample and the tests each would run
    python tools/mutate.py --modules "layers/*.py" --sample 0 --jobs 2   # every mutant of the layers
    python tools/mutate.py --rerun runs/mutation/results.json --jobs 2   # only the earlier survivors

How it works, and why (docs/testing.md has the rest):

* **Mutants from the AST** of every file the ``--modules`` globs select (default `DEFAULT_MODULES`), so
  the tool follows files that move and functions that are renamed. The operators (`OPERATORS`):
  arithmetic and bitwise operators swapped, comparisons moved across their boundary (``<`` -> ``<=``)
  and negated (``<`` -> ``>=``), ``and`` <-> ``or``, a unary minus or ``not`` dropped (sign flips),
  numbers changed (``n -> n + 1``, ``x -> 0``), ``True`` <-> ``False``, ``max`` <-> ``min`` style
  function swaps, the first two positional arguments of a call swapped, and ``raise`` / ``assert`` /
  checking calls (``check(...)``, ``_fail(...)``, ...) dropped. Docstrings, strings, f-strings,
  annotations and decorators are never mutated.
* **A deterministic sample**: every mutant has an id made of its file, enclosing function, operator,
  original and mutated text (no line numbers), and the sample is the ``--sample`` mutants of smallest
  ``sha256(seed:id)``. The same code gives the same sample; an edit elsewhere leaves it alone.
* **Tests per mutant, measured**: a coverage pass runs each test file once under coverage.py with one
  context per test (``tools/mutate_coverage.py``; cached in ``--out`` per test file, keyed by the
  contents of that file and of every non-test Python file). A mutant runs only the tests that executed
  its lines, fastest first, with ``pytest -x`` and a timeout; a mutant of code that runs at import
  (a module constant, a default argument, a class attribute) runs the tests of its enclosing function,
  class or, failing both, file. A mutant whose lines no test executes is reported as ``no coverage``
  without running anything.
* **Isolation**: each job copies the working tree (tracked and untracked, not ignored files) into a
  temporary folder once, and writes, tests and restores one mutant at a time there: the working tree is
  never touched, and Python is told not to write bytecode (a mutant of the same size written within the
  same second would otherwise load the previous mutant's cached bytecode).

Outputs in ``--out`` (default ``runs/mutation``): ``results.json`` (every mutant: where, what, status,
tests run, the test that killed it, seconds), ``results.csv`` (the same, one row per mutant) and
``report.md`` (score per module and the survivors). Known equivalent mutants are listed, with the reason
each cannot change behaviour, in ``tools/mutation_equivalents.json``; the score counts killed mutants
(a timeout counts as killed) over all mutants that are not known equivalents.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import csv
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
EQUIVALENTS = os.path.join(TOOLS, "mutation_equivalents.json")

# The core modules (globs relative to the repository root; a folder that replaces a module is matched too).
DEFAULT_MODULES = ("designmodels/*.py", "filters/*.py", "filters/**/*.py", "layers/*.py", "layers/**/*.py",
                   "experiments/tasks.py", "experiments/tasks/**/*.py", "experiments/training.py",
                   "experiments/training/**/*.py")
DEFAULT_TESTS = "tests/test_*.py"
# tests/test_docs.py runs the documentation (minutes, mostly the experiments' smoke runs in subprocesses,
# which coverage does not follow); the core modules are tested by the other files.
DEFAULT_EXCLUDED_TESTS = ("tests/test_docs.py",)
DEFAULT_SAMPLE = 150
STATUSES = ("killed", "timeout", "survived", "no coverage", "equivalent", "error")


# ----------------------------------------------------------------------------------------------------
# mutants
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Mutant:
    """One planted bug: the source text ``original`` at ``line:col .. end_line:end_col`` of ``path`` is
    replaced by ``mutated``. ``scope`` is the dotted name of the enclosing functions and classes;
    ``lines`` the lines whose execution means that the mutant's code ran; ``definition_time`` marks code
    that runs when its module is imported (module or class body, default arguments)."""

    path: str
    scope: str
    operator: str
    original: str
    replacement: str            # the exact text written in place of the original
    line: int
    col: int
    end_line: int
    end_col: int
    lines: tuple
    definition_time: bool
    scope_lines: tuple          # the line span of the innermost enclosing function or class, or ()
    occurrence: int = 0         # among mutants with the same path, scope, operator, original and mutated

    @property
    def mutated(self) -> str:
        return _one_line(self.replacement)

    @property
    def id(self) -> str:
        return (f"{self.path}::{self.scope or '<module>'}::{self.operator}::{self.original} -> {self.mutated}"
                + (f"::{self.occurrence}" if self.occurrence else ""))

    def apply(self, source: str) -> str:
        """``source`` with the mutant planted (ast's columns are UTF-8 byte offsets)."""
        lines = source.splitlines(keepends=True)
        offsets = [0]
        for text in lines:
            offsets.append(offsets[-1] + len(text.encode("utf-8")))
        data = source.encode("utf-8")
        start = offsets[self.line - 1] + self.col
        end = offsets[self.end_line - 1] + self.end_col
        return (data[:start] + self.replacement.encode("utf-8") + data[end:]).decode("utf-8")


# operator name -> what it does, for the report
OPERATORS = {
    "binary": "an arithmetic or bitwise operator swapped (+ -, * /, // /, ** *, @ *, & |, % *)",
    "augmented": "the operator of an augmented assignment swapped (+= -=, *= /=)",
    "boundary": "a comparison moved across its boundary (< <=, > >=)",
    "negate": "a comparison negated (< >=, == !=, is is not, in not in)",
    "boolean": "and <-> or",
    "sign": "a unary minus dropped (-x -> x)",
    "not": "a `not` dropped",
    "number": "a number changed (int n -> n + 1; float x -> 0, 0.0 -> 1.0)",
    "bool": "True <-> False",
    "function": "a function swapped for its opposite (max min, maximum minimum, argmax argmin, any all, tril triu, "
                "floor ceil)",
    "arguments": "the first two positional arguments of a call swapped (when both are values: names, attributes, "
                 "items, results)",
    "raise": "a raise dropped",
    "assert": "an assert dropped",
    "check": "a call to a checking function dropped (its name says check, valid, fail, ensure or verify)",
}

_BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
           ast.Pow: ast.Mult, ast.MatMult: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.Mod: ast.Mult}
_BOUNDARY = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
_NEGATE = {ast.Lt: ast.GtE, ast.LtE: ast.Gt, ast.Gt: ast.LtE, ast.GtE: ast.Lt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
           ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_FUNCTIONS = {"max": "min", "min": "max", "maximum": "minimum", "minimum": "maximum", "argmax": "argmin",
              "argmin": "argmax", "any": "all", "all": "any", "tril": "triu", "triu": "tril", "floor": "ceil",
              "ceil": "floor"}
# swapping the arguments of these changes nothing (or only the order of a result that is a set)
_SYMMETRIC = {"max", "min", "maximum", "minimum", "add", "multiply", "logical_and", "logical_or", "isclose",
              "allclose", "zip", "hypot", "promote_types", "result_type"}
_TYPE_CHECKS = {"isinstance", "issubclass", "getattr", "setattr", "hasattr"}
_VALUES = (ast.Name, ast.Attribute, ast.Subscript, ast.Call, ast.BinOp, ast.UnaryOp)
_CHECK_CALL = re.compile(r"check|valid|fail|ensure|verify", re.I)


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


class _Collector(ast.NodeVisitor):
    """Walks one module and yields `Mutant` records (see `OPERATORS`)."""

    def __init__(self, path: str, source: str):
        self.path, self.source = path, source
        self.mutants: list[Mutant] = []
        self.scopes: list[ast.AST] = []
        self.in_function = 0
        self.in_default = 0
        self.statements: list[ast.stmt] = []

    def visit(self, node):
        if isinstance(node, ast.stmt):
            self.statements.append(node)
            try:
                return super().visit(node)
            finally:
                self.statements.pop()
        return super().visit(node)

    # -- scopes ------------------------------------------------------------------------------------
    def _scope_name(self) -> str:
        return ".".join(s.name for s in self.scopes)

    def _visit_def(self, node):
        # decorators and annotations run at import and are not behaviour under test: never mutated
        self.scopes.append(node)
        self._visit_defaults(node.args)
        self.in_function += 1
        self._visit_body(node.body)
        self.in_function -= 1
        self.scopes.pop()

    def _visit_defaults(self, args):
        self.in_default += 1
        for default in [*args.defaults, *[d for d in args.kw_defaults if d is not None]]:
            self.visit(default)
        self.in_default -= 1

    def visit_Lambda(self, node):
        self._visit_defaults(node.args)
        self.in_function += 1
        self.visit(node.body)
        self.in_function -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_def

    def visit_ClassDef(self, node):
        for base in node.bases:
            self.visit(base)
        self.scopes.append(node)
        saved, self.in_function = self.in_function, 0
        self._visit_body(node.body)
        self.in_function = saved
        self.scopes.pop()

    def visit_Module(self, node):
        self._visit_body(node.body)

    def _visit_body(self, body):
        for i, stmt in enumerate(body):
            if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(
                    stmt.value.value, str):
                continue                                            # a docstring
            if _is_main_guard(stmt):
                continue
            self.visit(stmt)

    # -- never mutated -----------------------------------------------------------------------------
    def visit_JoinedStr(self, node):
        return

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)

    def visit_Import(self, node):
        return

    visit_ImportFrom = visit_Import

    # -- recording ---------------------------------------------------------------------------------
    def _add(self, operator: str, node: ast.AST, mutated_node: Optional[ast.AST] = None, *, text: Optional[str] = None,
             statement: bool = False):
        original = ast.get_source_segment(self.source, node)
        if original is None:
            return
        if text is None:
            text = ast.unparse(mutated_node)
            if not statement:
                text = f"({text})"
        if _normal(text) == _normal(original):
            return
        scope = self.scopes[-1] if self.scopes else None
        scope_lines = (scope.lineno, scope.end_lineno) if scope is not None else ()
        # a line tracer may report a multi-line statement at its first line only
        first = min(node.lineno, self.statements[-1].lineno) if self.statements else node.lineno
        self.mutants.append(Mutant(
            path=self.path, scope=self._scope_name(), operator=operator, original=_one_line(original),
            replacement=text, line=node.lineno, col=node.col_offset, end_line=node.end_lineno,
            end_col=node.end_col_offset, lines=tuple(range(first, node.end_lineno + 1)),
            definition_time=self.in_function == 0 or self.in_default > 0, scope_lines=scope_lines))

    # -- operators ---------------------------------------------------------------------------------
    def visit_BinOp(self, node):
        swap = _BINARY.get(type(node.op))
        if swap is not None:
            self._add("binary", node, ast.BinOp(node.left, swap(), node.right))
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        swap = _BINARY.get(type(node.op))
        if swap is not None:
            self._add("augmented", node, ast.AugAssign(node.target, swap(), node.value), statement=True)
        self.generic_visit(node)

    def visit_Compare(self, node):
        for i, op in enumerate(node.ops):
            for name, table in (("boundary", _BOUNDARY), ("negate", _NEGATE)):
                swap = table.get(type(op))
                if swap is not None:
                    ops = list(node.ops)
                    ops[i] = swap()
                    self._add(name, node, ast.Compare(node.left, ops, node.comparators))
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        swap = ast.Or if isinstance(node.op, ast.And) else ast.And
        self._add("boolean", node, ast.BoolOp(swap(), node.values))
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.USub):
            self._add("sign", node, node.operand)
        elif isinstance(node.op, ast.Not):
            self._add("not", node, node.operand)
        self.generic_visit(node)

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            self._add("bool", node, text=repr(not value))
        elif isinstance(value, int):
            self._add("number", node, text=repr(value + 1))
        elif isinstance(value, float):
            self._add("number", node, text=repr(0.0 if value else 1.0))

    def visit_Call(self, node):
        name = _callee(node)
        if name in _FUNCTIONS:
            func = node.func
            if isinstance(func, ast.Attribute):
                self._add("function", func, ast.Attribute(func.value, _FUNCTIONS[name], ast.Load()))
            else:
                self._add("function", func, text=_FUNCTIONS[name])
        if len(node.args) >= 2 and name not in _SYMMETRIC and name not in _TYPE_CHECKS:
            first, second = node.args[0], node.args[1]
            # two values of one kind (names, attributes, items, results): a swap that could go unnoticed
            if all(isinstance(a, _VALUES) for a in (first, second)) and ast.dump(first) != ast.dump(second):
                swapped = ast.Call(node.func, [second, first, *node.args[2:]], node.keywords)
                self._add("arguments", node, swapped)
        self.generic_visit(node)

    def visit_Raise(self, node):
        self._add("raise", node, text="pass", statement=True)
        # the exception's arguments are its message: not mutated

    def visit_Assert(self, node):
        self._add("assert", node, text="pass", statement=True)

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Call) and _CHECK_CALL.search(_callee(node.value)):
            self._add("check", node, text="pass", statement=True)
        self.generic_visit(node)


def _is_main_guard(stmt) -> bool:
    return (isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare)
            and isinstance(stmt.test.left, ast.Name) and stmt.test.left.id == "__name__")


def _normal(text: str) -> str:
    try:
        return ast.dump(ast.parse(text.strip()))
    except SyntaxError:
        return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def mutants_of(path: str) -> list[Mutant]:
    """Every candidate mutant of the file ``path`` (relative to the repository root), in source order
    (`planted` checks that one parses and changes the program)."""
    collector = _Collector(path, _source(path))
    collector.visit(ast.parse(_source(path), filename=path))
    seen: dict = {}
    for mutant in collector.mutants:
        key = (mutant.scope, mutant.operator, mutant.original, mutant.mutated)
        mutant.occurrence = seen.get(key, 0)
        seen[key] = mutant.occurrence + 1
    return collector.mutants


_SOURCES: dict = {}


def _source(path: str) -> str:
    if path not in _SOURCES:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            _SOURCES[path] = f.read()
    return _SOURCES[path]


def planted(mutant: Mutant) -> bool:
    """Whether the mutated file parses and differs from the original as a program (not only in layout)."""
    try:
        tree = ast.parse(mutant.apply(_source(mutant.path)))
    except SyntaxError:
        return False
    return ast.dump(tree) != ast.dump(ast.parse(_source(mutant.path)))


def select_files(patterns) -> list[str]:
    files = set()
    for pattern in patterns:
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            if path.endswith(".py") and os.path.isfile(path):
                files.add(os.path.relpath(path, ROOT))
    return sorted(files)


def sample(mutants: list[Mutant], size: int, seed: int) -> list[Mutant]:
    """The ``size`` mutants of smallest ``sha256(seed:id)`` that `planted` accepts (all when ``size`` is
    0), in source order."""
    rank = lambda m: hashlib.sha256(f"{seed}:{m.id}".encode()).hexdigest()
    chosen = set()
    for mutant in sorted(mutants, key=rank):
        if size and len(chosen) == size:
            break
        if planted(mutant):
            chosen.add(id(mutant))
    return [m for m in mutants if id(m) in chosen]


# ----------------------------------------------------------------------------------------------------
# which tests execute which lines
# ----------------------------------------------------------------------------------------------------

def _digest(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.encode())
        with open(os.path.join(ROOT, path), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def _python_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return [p for p in listed if os.path.exists(os.path.join(ROOT, p))]


@dataclasses.dataclass
class CoverageMap:
    """``lines[path][line]`` -> test ids; ``durations[test]`` in seconds (from the coverage pass)."""

    lines: dict
    durations: dict
    failed: list

    def tests_for(self, mutant: Mutant) -> list[str]:
        by_line = self.lines.get(mutant.path, {})
        if not mutant.definition_time:
            found = set().union(*(by_line.get(line, ()) for line in mutant.lines))
            return sorted(found, key=self._order)
        # import-time code: the tests that run its enclosing function or class, else any line of its file
        if mutant.scope_lines:
            first, last = mutant.scope_lines
            found = set().union(*(tests for line, tests in by_line.items() if first <= line <= last))
            if found:
                return sorted(found, key=self._order)
        return sorted(set().union(*by_line.values()), key=self._order)

    def _order(self, test: str):
        return (self.durations.get(test, 0.0), test)


def coverage_map(test_files: list[str], include: list[str], cache_dir: str, jobs: int, log) -> CoverageMap:
    """Run each test file under ``tools/mutate_coverage.py`` (or reuse its cached result)."""
    try:
        import coverage  # noqa: F401
    except ImportError:
        sys.exit("tools/mutate.py needs coverage.py: pip install -e \".[mutation]\"")
    os.makedirs(cache_dir, exist_ok=True)
    # what the recorded lines depend on: the code and the test helpers (this script itself does not count)
    sources = [p for p in _python_files() if p not in test_files and p != os.path.join("tools", "mutate.py")]
    base = _digest(sources)
    cache_path = lambda test_file: os.path.join(cache_dir, "{}.{}.json".format(os.path.basename(test_file), hashlib.sha256(
        f"{base}:{_digest([test_file])}".encode()).hexdigest()[:16]))
    todo, results = [], {}
    for test_file in test_files:
        cached = cache_path(test_file)
        if os.path.exists(cached):
            with open(cached, encoding="utf-8") as f:
                results[test_file] = json.load(f)
        else:
            todo.append((test_file, cached))

    def collect(item):
        test_file, _ = item
        cached = cache_path(test_file)      # the file as pytest reads it now (it may have been edited since)
        start = time.time()
        env = {**os.environ, "MUTATE_INCLUDE": json.dumps([os.path.join(ROOT, p) for p in include]),
               "MUTATE_OUTPUT": cached + ".part", "PYTHONPATH": os.pathsep.join(
                   [TOOLS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "mutate_coverage", "-p",
                              "no:cacheprovider", test_file], cwd=ROOT, env=env, capture_output=True, text=True)
        if not os.path.exists(cached + ".part"):
            raise RuntimeError(f"the coverage pass of {test_file} wrote nothing (exit {run.returncode}):\n"
                               f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        os.replace(cached + ".part", cached)
        log(f"coverage pass: {test_file} in {time.time() - start:.0f} s")
        with open(cached, encoding="utf-8") as f:
            return test_file, json.load(f)

    if todo:
        log(f"coverage pass over {len(todo)} test files ({len(test_files) - len(todo)} cached), {jobs} at a time")
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for test_file, data in pool.map(collect, sorted(todo, key=lambda t: -os.path.getsize(
                    os.path.join(ROOT, t[0])))):
                results[test_file] = data

    lines: dict = {}
    durations: dict = {}
    failed: list = []
    for data in results.values():
        tests = data["tests"]
        durations.update(data["durations"])
        failed.extend(data["failed"])
        for path, by_line in data["lines"].items():
            rel = os.path.relpath(path, ROOT)
            target = lines.setdefault(rel, {})
            for line, ids in by_line.items():
                target.setdefault(int(line), set()).update(tests[i] for i in ids if tests[i] not in data["failed"])
    return CoverageMap(lines, durations, sorted(failed))


# ----------------------------------------------------------------------------------------------------
# running mutants
# ----------------------------------------------------------------------------------------------------

def _copy_tree(destination: str) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for path in listed:
        source = os.path.join(ROOT, path)
        if os.path.isfile(source) and not path.endswith((".png", ".pyc")):
            os.makedirs(os.path.dirname(os.path.join(destination, path)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, path))


def _check_copy_imports_itself(copy: str) -> None:
    """The copy's packages must shadow any installed ones (``pip install -e`` of another checkout)."""
    probe = subprocess.run([sys.executable, "-c", "import filters, os; print(os.path.realpath(filters.__file__))"],
                           cwd=copy, capture_output=True, text=True, env=_test_env())
    if not probe.stdout.strip().startswith(os.path.realpath(copy)):
        raise RuntimeError(f"a test run in {copy} imports filters from {probe.stdout.strip() or probe.stderr}")


def _test_env() -> dict:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1"}


def run_mutant(mutant: Mutant, tests: list[str], copy: str, timeout: float) -> dict:
    """Apply ``mutant`` in the copy, run ``tests`` with ``-x``, restore the file; the outcome."""
    target = os.path.join(copy, mutant.path)
    with open(target, encoding="utf-8") as f:
        source = f.read()
    start = time.time()
    try:
        with open(target, "w", encoding="utf-8") as f:
            f.write(mutant.apply(source))
        try:
            run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o",
                                  "addopts=", "--tb=line", "-rf", *tests], cwd=copy, env=_test_env(),
                                 capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "seconds": round(time.time() - start, 1), "killed_by": None}
    finally:
        with open(target, "w", encoding="utf-8") as f:
            f.write(source)
    seconds = round(time.time() - start, 1)
    output = run.stdout + run.stderr
    if run.returncode == 0:
        return {"status": "survived", "seconds": seconds, "killed_by": None}
    if run.returncode < 0 or run.returncode == 5 or (run.returncode == 4 and "not found:" in output):
        # stopped by a signal from outside, or the tool's fault (no test collected, a test not found)
        return {"status": "error", "seconds": seconds, "killed_by": None, "output": output[-2000:]}
    if run.returncode:                # a test failed, or the mutant broke an import or collection
        failed = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
        return {"status": "killed", "seconds": seconds, "killed_by": failed[1] if failed else f"exit {run.returncode}"}


def _timeout(tests: list[str], cover: CoverageMap, factor: float) -> float:
    expected = sum(cover.durations.get(t, 1.0) for t in tests)
    return 60.0 + factor * expected


# ----------------------------------------------------------------------------------------------------
# equivalents and the report
# ----------------------------------------------------------------------------------------------------

def load_equivalents() -> list[dict]:
    if not os.path.exists(EQUIVALENTS):
        return []
    with open(EQUIVALENTS, encoding="utf-8") as f:
        return json.load(f)


def equivalent_reason(mutant: Mutant, equivalents: list[dict]) -> Optional[str]:
    """The reason recorded for a known equivalent mutant: matched by file name, scope, original and
    mutated text (not by line), so that it follows the code when other code moves; ``occurrence``, when
    given, picks one of several identical edits in one scope (counted in source order from 0)."""
    for entry in equivalents:
        if (os.path.basename(mutant.path) == os.path.basename(entry["file"]) and mutant.scope == entry["scope"]
                and mutant.original == entry["original"] and mutant.mutated == entry["mutated"]
                and entry.get("occurrence", mutant.occurrence) == mutant.occurrence):
            return entry["reason"]
    return None


def score(records: list[dict]) -> dict:
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    detected = counts["killed"] + counts["timeout"]
    considered = len(records) - counts["equivalent"] - counts["error"]
    return {"mutants": len(records), **counts,
            "score": round(100.0 * detected / considered, 1) if considered else None}


def write_report(out: str, records: list[dict], summary: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "mutants": records}, f, indent=1)
    fields = ["id", "path", "line", "scope", "operator", "original", "mutated", "status", "tests", "killed_by",
              "seconds", "reason"]
    with open(os.path.join(out, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    lines = [f"# Mutation testing: {summary['date']}", "",
             f"`{summary['command']}` at commit `{summary['commit']}`: **{summary['score']['score']}%** of "
             f"{summary['score']['mutants'] - summary['score']['equivalent'] - summary['score']['error']} mutants "
             f"detected ({summary['score']['equivalent']} known equivalents left out), in "
             f"{summary['seconds'] / 60:.0f} min.", ""]
    if "rerun_of" in summary:
        first = summary["rerun_of"]
        lines += [f"This run ran again the {summary['rerun']} mutants that survived `{first['command']}` "
                  f"({first['date']}, commit `{first['commit']}`, {first['seconds'] / 60:.0f} min); the records of "
                  "the others are carried over from it.", ""]
    lines += ["| module | mutants | killed | timeout | survived | no coverage | equivalent | error | score |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted({r["path"] for r in records}):
        s = score([r for r in records if r["path"] == path])
        lines.append(f"| `{path}` | {s['mutants']} | {s['killed']} | {s['timeout']} | {s['survived']} | "
                     f"{s['no coverage']} | {s['equivalent']} | {s['error']} | {s['score']}% |")
    s = summary["score"]
    lines.append(f"| **all** | {s['mutants']} | {s['killed']} | {s['timeout']} | {s['survived']} | {s['no coverage']} "
                 f"| {s['equivalent']} | {s['error']} | **{s['score']}%** |")
    survivors = [r for r in records if r["status"] in ("survived", "no coverage", "equivalent", "error")]
    if survivors:
        lines += ["", "| status | where | operator | original -> mutated | tests run | why |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in survivors:
            lines.append(f"| {r['status']} | `{r['path']}:{r['line']}` `{r['scope'] or '<module>'}` | {r['operator']} | "
                         f"`{_cell(r['original'])}` -> `{_cell(r['mutated'])}` | {r['tests']} | {r.get('reason') or ''} |")
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _cell(text: str, width: int = 70) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[:width - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES),
                        help="globs of the files to mutate, relative to the repository root")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                        help="how many mutants (a deterministic sample; 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--jobs", type=int, default=1, help="mutants (and coverage passes) run at a time")
    parser.add_argument("--tests", default=DEFAULT_TESTS, help="glob of the test files")
    parser.add_argument("--exclude-tests", nargs="*", default=list(DEFAULT_EXCLUDED_TESTS),
                        help="test files left out")
    parser.add_argument("--timeout-factor", type=float, default=3.0,
                        help="a mutant's timeout: 60 s + this times its tests' measured seconds")
    parser.add_argument("--out", default="runs/mutation", help="folder of the results and the coverage cache")
    parser.add_argument("--rerun", default=None,
                        help="a results.json: run only its survivors and no-coverage mutants (by id)")
    parser.add_argument("--ids", nargs="*", default=None, help="run only these mutant ids")
    parser.add_argument("--list", action="store_true", help="list the sample (and its tests) without running")
    return parser.parse_args(argv)


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return head.strip() + ("+uncommitted" if dirty.strip() else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.join(ROOT, args.out) if not os.path.isabs(args.out) else args.out
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
    started = time.time()

    files = select_files(args.modules)
    if not files:
        sys.exit(f"--modules {' '.join(args.modules)}: no Python file matches (globs relative to {ROOT}).")
    everything = [m for path in files for m in mutants_of(path)]
    mutants = sample(everything, args.sample, args.seed)
    wanted = set(args.ids or ())
    carried, previous = [], None
    if args.rerun:
        # run the earlier survivors again (after tests were added); the mutants that were killed stay killed
        # as long as no test was weakened, so their records are carried into this run's report
        with open(args.rerun, encoding="utf-8") as f:
            previous = json.load(f)
        again = {r["id"] for r in previous["mutants"] if r["status"] in ("survived", "no coverage", "error")}
        wanted |= again
        carried = [r for r in previous["mutants"] if r["id"] not in again]
    if wanted:
        mutants = [m for m in everything if m.id in wanted]
        missing = wanted - {m.id for m in mutants}
        if missing:
            log(f"{len(missing)} requested ids are not mutants of today's code (the code changed): "
                + "; ".join(sorted(missing)[:5]))
            carried += [r for r in (previous or {"mutants": []})["mutants"] if r["id"] in missing]
    log(f"{len(everything)} mutants in {len(files)} files; running {len(mutants)}")

    test_files = [p for p in (os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, args.tests))))
                  if p not in args.exclude_tests]
    sources = [p for p in _python_files() if not p.startswith("tests" + os.sep)]
    cover = coverage_map(test_files, sources, os.path.join(out, "coverage"), max(1, args.jobs), log)
    if cover.failed:
        log(f"left out, failing without any mutant: {', '.join(cover.failed)}")

    equivalents = load_equivalents()
    plan = []
    for mutant in mutants:
        tests = cover.tests_for(mutant)
        plan.append((mutant, tests))
    if args.list:
        for mutant, tests in plan:
            print(f"{mutant.path}:{mutant.line}  {mutant.id}  [{len(tests)} tests, "
                  f"{sum(cover.durations.get(t, 0) for t in tests):.0f} s]")
        return 0

    records: list = []
    lock = threading.Lock()
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "partial.jsonl")):
        os.remove(os.path.join(out, "partial.jsonl"))
    copies: queue.Queue = queue.Queue()
    workdir = tempfile.mkdtemp(prefix="mutate-")
    try:
        for j in range(max(1, args.jobs)):
            copy = os.path.join(workdir, f"job{j}")
            _copy_tree(copy)
            copies.put(copy)
        _check_copy_imports_itself(copies.queue[0])

        def work(item):
            mutant, tests = item
            record = {"id": mutant.id, "path": mutant.path, "line": mutant.line, "scope": mutant.scope,
                      "operator": mutant.operator, "original": mutant.original, "mutated": mutant.mutated,
                      "tests": len(tests), "killed_by": None, "seconds": 0.0, "reason": None}
            reason = equivalent_reason(mutant, equivalents)
            if reason is not None:
                record.update(status="equivalent", reason=reason)
            elif not tests:
                record.update(status="no coverage")
            else:
                copy = copies.get()
                try:
                    record.update(run_mutant(mutant, tests, copy, _timeout(tests, cover, args.timeout_factor)))
                finally:
                    copies.put(copy)
            with lock:
                records.append(record)
                with open(os.path.join(out, "partial.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")     # a run cut short keeps what it measured
                log(f"{len(records)}/{len(plan)} {record['status']:<11} {record['seconds']:>6.1f} s  "
                    f"{mutant.path}:{mutant.line} {mutant.id.split('::', 2)[2]}")
            return record

        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(work, plan))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rerun = len(records)
    records = sorted(records + carried, key=lambda r: (r["path"], r["line"], r["id"]))
    summary = {"date": datetime.date.today().isoformat(), "commit": _commit(),
               "command": "python tools/mutate.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "seconds": round(time.time() - started), "score": score(records),
               "total_mutants": len(everything), "files": files}
    if previous is not None:
        summary["rerun_of"] = {k: previous["summary"][k] for k in ("date", "commit", "command", "seconds")}
        summary["rerun"] = rerun
    write_report(out, records, summary)
    s = summary["score"]
    log(f"score {s['score']}%: {s['killed']} killed, {s['timeout']} timeouts, {s['survived']} survived, "
        f"{s['no coverage']} without coverage, {s['equivalent']} known equivalents, {s['error']} errors; "
        f"{os.path.relpath(os.path.join(out, 'report.md'), ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
