"""Mutation testing of dpbr's numerical core: do the tests notice when the code is wrong?

    python bench/mutation.py [--module dpbr/simulation/engine.py ...] [--lines 320-410] [--function 'Simulation._run']
                             [--sample 60 --seed 0] [--max-mutants N] [--jobs 1] [--out results/mutation/report]
                             [--id ID] [--rerun results/mutation/report.json] [--tests tests/test_x.py]
                             [--list] [--report-only] [--runner fork|subprocess] [--no-coverage-filter]

A *mutant* is a copy of the code with one small deliberate fault (DeMillo, Lipton and Sayward 1978,
"Hints on test data selection"; Jia and Harman 2011, "An analysis and survey of the development of
mutation testing", IEEE TSE 37(5)): ``+`` → ``-``, ``<`` → ``<=``, ``0`` → ``1``, ``and`` → ``or``, a
negated condition, two call arguments swapped, a keyword argument dropped, an in-place ``mul_`` link
or a whole statement dropped. The relevant fast test files run against each mutant; a mutant they
fail on is *killed*, one they pass on *survived* — either an equivalent mutant (same behaviour: the
code cannot be wrong that way) or a behaviour no test pins down.

How it runs
-----------
* The tree is copied (without ``.venv``, ``.git``, ``results``) to a scratch folder per job; each
  mutant is written into that copy only — the working tree is never touched — and
  ``python -m pytest <files> -x -q -p no:cacheprovider`` runs from the copy, so its ``dpbr`` is the one
  imported (``PYTHONPATH`` points there too, for tests that start ``python -m dpbr``). The run checks
  this at the start.
* ``--runner fork`` (default, POSIX): one server process per job imports torch, NumPy and pytest
  once — never dpbr — and forks a child per mutant that runs ``pytest.main`` in the copy, saving the
  2–3 s import of torch per mutant. ``--runner subprocess`` starts ``python -m pytest`` afresh per
  mutant (slower, nothing shared). Neither writes bytecode for the mutated module.
* Per module, the unmutated tests run first (baseline: they must pass); a mutant's timeout is
  ``--timeout-factor`` (3) × that time, at least ``--min-timeout`` seconds. The baseline also records
  which lines of the module the tests execute (``sys.settrace``); a mutant on a line they never reach
  is reported ``uncovered`` without running (it cannot be killed; ``--no-coverage-filter`` runs it).
* Results are appended to a cache (``--cache``, JSON lines keyed by a mutant id that hashes the
  module's source and the mutation): an interrupted run continues where it stopped. A cached
  ``killed`` is reused while the module's source is unchanged and the test files that killed it are
  still among those run; the other results only while the test files are unchanged too (new tests
  may kill them).

Not mutated: docstrings and other strings, f-strings, ``.format``/``%`` formatting, calls of
``log``/``logger``/``logging``/``warnings``/``timer``/``print``/``progress``, ``raise`` statements
(the messages of ``UsageError``), ``assert`` statements, type annotations, decorators, imports,
``__all__`` and lines ending in ``# pragma: no mutate``.

Output: a Markdown table killed / survived / timeout / uncovered per module and the survivors by
``file:line`` with the mutation (``--out PREFIX`` writes ``PREFIX.md`` and ``PREFIX.json``; the
Markdown is printed too). A script for maintainers, not a test: mutation testing of the whole scope
takes hours on a 2-core machine, so run it on the code you changed (``--module``/``--lines``/
``--function``) or on a seeded ``--sample``.

Why not mutmut: mutmut 3.8 works with this layout (``source_paths = ["dpbr/"]``, ``only_mutate``,
``pytest_add_cli_args_test_selection``) and is fast, because it forks workers from a process that
has already imported the code under test. That process had also created the privacy module's
cached noise-drawing thread pool, which forked children inherit without its threads, so every
mutant reaching the parallel draw hung (20 false timeouts among the first 544 mutants of
``mechanisms.py``); about 60 % of its 109 survivors there were error-message strings or arguments
replaced by ``None``; and it offers no line ranges, seeded samples or module → test-file mapping.
This tool forks before dpbr is imported and leaves strings alone.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: The default scope (globs; ``__init__.py`` files left out): the simulation step and its metrics,
#: the robust rules and attacks, the linear algebra they share, privacy.
DEFAULT_MODULES = ["dpbr/simulation/*.py", "dpbr/robust/*.py", "dpbr/linalg.py", "dpbr/privacy/*.py"]

#: Module (glob) → the fast test files that exercise it; the first matching pattern wins. Those that
#: exist are used, in this order (the most direct first, since ``-x`` stops at the first failure);
#: ``tests/test_mutation_killers.py`` is added to every module when present.
TESTS: list[tuple[str, list[str]]] = [
    ("dpbr/simulation/partitions.py", ["tests/test_partitions.py", "tests/test_reference_step.py"]),
    ("dpbr/simulation/*.py", ["tests/test_reference_step.py", "tests/test_train.py"]),
    ("dpbr/robust/aggregators.py", ["tests/test_aggregators.py", "tests/test_peers.py"]),
    ("dpbr/robust/attacks.py", ["tests/test_attacks.py", "tests/test_peers.py"]),
    ("dpbr/linalg.py", ["tests/test_aggregators.py", "tests/test_attacks.py", "tests/test_train.py"]),
    ("dpbr/privacy/mechanisms.py", ["tests/test_privacy.py", "tests/test_reference_step.py"]),
    ("dpbr/privacy/accounting.py", ["tests/test_accounting.py", "tests/test_privacy.py"]),
]
EXTRA_TESTS = ["tests/test_mutation_killers.py"]

PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]
#: Not copied to the scratch tree: these names at the top level, and the caches anywhere.
COPY_SKIP_TOP = {".venv", ".git", "results", "data", "logs", ".cache", ".snakemake", "mutants"}
COPY_SKIP_ANY = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis")


def _copy_ignore(folder: str, names: list[str]) -> set[str]:
    skip = set(COPY_SKIP_ANY(folder, names))
    if Path(folder).resolve() == ROOT:
        skip |= COPY_SKIP_TOP & set(names)
    return skip

# Calls whose arguments are messages or side channels (never mutated, nor dropped).
SKIP_CALL_ROOTS = {"log", "logger", "logging", "warnings", "timer", "console"}
SKIP_CALL_NAMES = {"print", "progress"}
# Calls whose first two positional arguments commute (swapping them gives an equivalent mutant).
COMMUTATIVE_CALLS = {"add", "mul", "maximum", "minimum", "max", "min", "eq", "ne", "logical_and", "logical_or",
                     "logical_xor", "hypot", "isinstance", "issubclass", "getattr", "hasattr", "setattr", "zip",
                     "dict", "tuple", "list", "set", "frozenset"}
NAME_SWAPS = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "amin": "amax",
              "amax": "amin", "argmin": "argmax", "argmax": "argmin", "clamp_min": "clamp_max",
              "clamp_max": "clamp_min", "floor": "ceil", "ceil": "floor", "sum": "mean", "mean": "sum",
              "any": "all", "all": "any"}
BINOPS = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
          ast.FloorDiv: ("//", "/"), ast.Pow: ("**", "*"), ast.BitAnd: ("&", "|"), ast.BitOr: ("|", "&")}
CMPOPS = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
          ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is"),
          ast.In: ("in", "not in"), ast.NotIn: ("not in", "in")}


# ----------------------------------------------------------------------------------------------- #
# Mutants


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One mutation of one module: replace the text between ``(line, col)`` and ``(end_line, end_col)``
    (1-based lines, 0-based character columns) by ``replacement``."""

    module: str
    line: int
    col: int
    end_line: int
    end_col: int
    operator: str
    original: str
    replacement: str
    function: str
    id: str = ""

    def describe(self) -> str:
        """``original → replacement`` on one line (long texts shortened)."""
        def short(s: str) -> str:
            s = " ".join(s.split())
            return s if len(s) <= 70 else s[:67] + "…"
        return f"`{short(self.original)}` → `{short(self.replacement)}`"


class _Source:
    """A module's text with conversions between AST positions (UTF-8 byte columns) and characters."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for ln in self.lines:
            self.starts.append(self.starts[-1] + len(ln))
        self.tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))

    def char_col(self, line: int, byte_col: int) -> int:
        return len(self.lines[line - 1].encode()[:byte_col].decode(errors="replace"))

    def offset(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col

    def start(self, node: ast.AST) -> tuple[int, int]:
        return node.lineno, self.char_col(node.lineno, node.col_offset)  # type: ignore[attr-defined]

    def end(self, node: ast.AST) -> tuple[int, int]:
        return node.end_lineno, self.char_col(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]

    def segment(self, a: tuple[int, int], b: tuple[int, int]) -> str:
        return self.text[self.offset(*a):self.offset(*b)]

    def find_tokens(self, a: tuple[int, int], b: tuple[int, int], strings: tuple[str, ...]) -> list[tokenize.TokenInfo]:
        """Tokens between positions ``a`` and ``b`` whose string is in ``strings``."""
        return [t for t in self.tokens if a <= t.start and t.end <= b and t.string in strings]


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _skipped_call(call: ast.Call) -> bool:
    name = _call_name(call)
    if isinstance(call.func, ast.Name) and name in SKIP_CALL_NAMES:
        return True
    if isinstance(call.func, ast.Attribute) and (name == "format" or _root_name(call.func) in SKIP_CALL_ROOTS):
        return True
    return False


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _new_number(value: int | float) -> list[int | float]:
    """The replacements of a numeric constant: ``0 ↔ 1``, ``0.5 → 1``, ``1 → 2`` and ``x → x + 1``."""
    if isinstance(value, int):
        return [1] if value == 0 else [0, 2] if value == 1 else [value + 1]
    if value == 0.0:
        return [1.0]
    if value == 1.0:
        return [0.0]
    if value == 0.5:
        return [1.0]
    return [value + 1.0]


class _Collector(ast.NodeVisitor):
    """Walks a module and lists its mutants (see the module docstring for the operators)."""

    def __init__(self, module: str, src: _Source) -> None:
        self.module, self.src = module, src
        self.out: list[Mutant] = []
        self.scope: list[str] = []
        self.no_mutate = {i + 1 for i, ln in enumerate(src.lines) if "pragma: no mutate" in ln}

    # -- helpers -------------------------------------------------------------------------------- #

    def add(self, node_or_start: Any, end: tuple[int, int] | None, operator: str, replacement: str) -> None:
        a = self.src.start(node_or_start) if end is None else node_or_start
        b = self.src.end(node_or_start) if end is None else end
        if a[0] in self.no_mutate:
            return
        original = self.src.segment(a, b)
        if original == replacement:
            return
        self.out.append(Mutant(self.module, a[0], a[1], b[0], b[1], operator, original, replacement,
                               ".".join(self.scope) or "<module>"))

    def text(self, node: ast.AST) -> str:
        return self.src.segment(self.src.start(node), self.src.end(node))

    # -- skipped subtrees ----------------------------------------------------------------------- #

    def visit_Raise(self, node: ast.Raise) -> None:
        return

    def visit_Assert(self, node: ast.Assert) -> None:
        return

    def visit_Import(self, node: ast.Import) -> None:
        return

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        return

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def _body(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if not _is_docstring(stmt):
                self.visit(stmt)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(d)
        self._body(node.body)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self._body(node.body)
        self.scope.pop()

    def visit_Module(self, node: ast.Module) -> None:
        self._body(node.body)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        if any(isinstance(t, ast.Subscript) for t in node.targets):  # an in-place write
            self.add(node, None, "stmt-drop", "pass")
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            self.negate(node.test)
        self.generic_visit(node)

    def visit_While(self, node: ast.While) -> None:
        self.negate(node.test)
        self.generic_visit(node)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self.negate(node.test)
        self.generic_visit(node)

    def negate(self, test: ast.expr) -> None:
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            return  # the not-drop mutant of that UnaryOp is the same
        self.add(test, None, "negate-cond", f"not ({self.text(test)})")

    # -- expressions ---------------------------------------------------------------------------- #

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if _is_str(node.left) or _is_str(node.right):
            return  # string formatting or concatenation
        swap = BINOPS.get(type(node.op))
        if swap is not None:
            toks = self.src.find_tokens(self.src.end(node.left), self.src.start(node.right), (swap[0],))
            if len(toks) == 1:
                self.add(toks[0].start, toks[0].end, "arith", swap[1])
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        swap = BINOPS.get(type(node.op))
        if swap is not None:
            toks = self.src.find_tokens(self.src.end(node.target), self.src.start(node.value), (swap[0] + "=",))
            if len(toks) == 1:
                self.add(toks[0].start, toks[0].end, "arith", swap[1] + "=")
        self.add(node, None, "stmt-drop", "pass")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            old, new = CMPOPS[type(op)]
            words = tuple(old.split())
            toks = self.src.find_tokens(self.src.end(left), self.src.start(right), words)
            if len(toks) == len(words):
                self.add(toks[0].start, toks[-1].end, "compare", new)
            left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        a, b = self.src.start(node), self.src.end(node)
        # the operators between the values (not those of nested BoolOps)
        toks = []
        for left, right in zip(node.values[:-1], node.values[1:]):
            toks += self.src.find_tokens(self.src.end(left), self.src.start(right), (old,))
        if toks:
            text = self.src.text
            pieces, pos = [], self.src.offset(*a)
            for t in toks:
                pieces.append(text[pos:self.src.offset(*t.start)])
                pieces.append(new)
                pos = self.src.offset(*t.end)
            pieces.append(text[pos:self.src.offset(*b)])
            self.add(node, None, "boolop", "".join(pieces))
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            self.add(node, None, "not-drop", f"({self.text(node.operand)})")
        elif isinstance(node.op, ast.USub) and not isinstance(node.operand, ast.Constant):
            self.add(node, None, "neg-drop", f"({self.text(node.operand)})")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        v = node.value
        if isinstance(v, bool):
            self.add(node, None, "const", repr(not v))
        elif isinstance(v, (int, float)) and not isinstance(v, complex):
            for new in _new_number(v):
                self.add(node, None, "const", repr(new))

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Call) and not _skipped_call(node.value):
            self.add(node, None, "stmt-drop", "pass")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if _skipped_call(node):
            return
        name = _call_name(node)
        f = node.func
        # min ↔ max, sum ↔ mean, …
        if name in NAME_SWAPS:
            end = self.src.end(f)
            start = (end[0], end[1] - len(name))
            self.add(start, end, "call-name", NAME_SWAPS[name])
        # drop one link of an in-place chain: x.mul_(a).add_(b) → x.add_(b)
        if (isinstance(f, ast.Attribute) and f.attr.endswith("_") and isinstance(f.value, ast.Call)
                and isinstance(f.value.func, ast.Attribute) and f.value.func.attr.endswith("_")):
            self.add(f.value, None, "inplace-link-drop", self.text(f.value.func.value))
        # swap the first two positional arguments
        args = node.args
        if (len(args) >= 2 and name not in COMMUTATIVE_CALLS
                and not any(isinstance(a, ast.Starred) for a in args[:2])
                and self.text(args[0]) != self.text(args[1])):
            a0, a1 = args[0], args[1]
            between = self.src.segment(self.src.end(a0), self.src.start(a1))
            self.add(self.src.start(a0), self.src.end(a1), "arg-swap", self.text(a1) + between + self.text(a0))
        # drop a keyword argument (its default applies)
        elements = sorted(list(args) + [k for k in node.keywords], key=lambda e: (e.lineno, e.col_offset))
        for i, kw in enumerate(elements):
            if not isinstance(kw, ast.keyword) or kw.arg is None:
                continue
            if i > 0:  # from the end of the previous element to the end of this one
                self.add(self.src.end(elements[i - 1]), self.src.end(kw), "kwarg-drop", "")
            elif len(elements) > 1:  # the first element: up to the start of the next one
                self.add(self.src.start(kw), self.src.start(elements[1]), "kwarg-drop", "")
            else:
                self.add(kw, None, "kwarg-drop", "")
        self.generic_visit(node)

    def visit_arguments(self, node: ast.arguments) -> None:
        return  # annotations; defaults are visited by visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.body)


def apply(text: str, m: Mutant) -> str:
    """``text`` with mutant ``m`` applied."""
    src = _Source.__new__(_Source)
    src.lines = text.splitlines(keepends=True)
    src.starts = [0]
    for ln in src.lines:
        src.starts.append(src.starts[-1] + len(ln))
    a, b = src.starts[m.line - 1] + m.col, src.starts[m.end_line - 1] + m.end_col
    return text[:a] + m.replacement + text[b:]


def mutants_of(module: str, text: str) -> list[Mutant]:
    """All mutants of a module's source ``text`` (valid Python, distinct), in source order, with ids."""
    src = _Source(text)
    col = _Collector(module, src)
    col.visit(ast.parse(text))
    source_hash = hashlib.sha256(text.encode()).hexdigest()
    seen: set[str] = set()
    out = []
    for m in sorted(col.out, key=lambda m: (m.line, m.col, m.operator, m.replacement)):
        mutated = apply(text, m)
        try:
            compile(mutated, module, "exec")
        except SyntaxError:
            continue
        digest = hashlib.sha256(mutated.encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        mid = hashlib.sha256(f"{module}\0{source_hash}\0{digest}".encode()).hexdigest()[:16]
        out.append(dataclasses.replace(m, id=mid))
    return out


# ----------------------------------------------------------------------------------------------- #
# Running the tests in a scratch copy

_SERVER_PRELOAD = ["torch", "numpy", "scipy", "pandas", "pyarrow", "typer", "rich", "hypothesis", "pytest",
                   "_pytest.main", "_pytest.python", "_pytest.assertion.rewrite"]

_TRACE_BOOTSTRAP = r"""
import json, os, sys, threading
target = os.path.realpath(sys.argv[1]); out = sys.argv[2]; lines = set()
def local(frame, event, arg):
    if event == "line":
        lines.add(frame.f_lineno)
    return local
known = {}
def tracer(frame, event, arg):
    name = frame.f_code.co_filename
    hit = known.get(name)
    if hit is None:
        hit = known[name] = os.path.realpath(name) == target
    if hit:
        lines.add(frame.f_lineno)
        return local
    return None
sys.path.insert(0, os.getcwd())
import pytest
sys.settrace(tracer); threading.settrace(tracer)
rc = pytest.main(sys.argv[3:])
sys.settrace(None)
json.dump(sorted(lines), open(out, "w"))
sys.exit(int(rc))
"""


def _child_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _serve() -> None:
    """The fork server (``--serve``): reads one JSON request per line on stdin, answers on stdout.

    Request ``{"args": [...], "timeout": s, "log": path}`` → ``{"rc", "seconds", "timed_out"}``: a
    forked child runs ``pytest.main(args)`` in the current directory with its output in ``log``
    (with ``"code"``, it runs that Python code instead).
    """
    scratch = os.getcwd()
    sys.path[0] = scratch
    sys.dont_write_bytecode = True
    for name in _SERVER_PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - optional speed-up only
            pass
    assert "dpbr" not in sys.modules, "the fork server must not import dpbr"
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.setpgid(0, 0)
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                if req.get("code"):  # a check run in the same conditions as the tests
                    exec(req["code"], {"__name__": "__check__"})
                    rc = 0
                else:
                    import pytest
                    rc = int(pytest.main(req["args"]))
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                import traceback
                traceback.print_exc()
                rc = 3
            os._exit(rc)
        timed_out, status = False, None
        deadline = t0 + req["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() > deadline:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        rc = None if timed_out else (os.waitstatus_to_exitcode(status) if status is not None else None)
        out.write(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "timed_out": timed_out}) + "\n")
        out.flush()


class Worker:
    """A scratch copy of the tree and the way tests run in it (one per ``--jobs``)."""

    def __init__(self, index: int, runner: str, keep: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"dpbr-mutation-{index}-"))
        self.keep = keep
        shutil.copytree(ROOT, self.dir, ignore=_copy_ignore, dirs_exist_ok=True)
        # bytecode of the unmutated package once (children write none; a mutated module's is deleted)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(self.dir / "dpbr")], check=False,
                       capture_output=True)
        self.runner = runner
        self.env = _child_env(self.dir)
        self.log = self.dir / ".mutation-pytest.log"
        self.proc: subprocess.Popen[str] | None = None
        if runner == "fork":
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"], cwd=self.dir,
                                         env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def pytest_args(self, tests: list[str]) -> list[str]:
        return [*tests, *PYTEST_ARGS, f"--basetemp={self.dir / '.mutation-tmp'}"]

    def run_tests(self, tests: list[str], timeout: float, code: str | None = None) -> dict[str, Any]:
        """Run the test files in the copy: ``{"rc", "seconds", "timed_out", "output"}`` (or the Python
        ``code`` instead, under the same runner)."""
        shutil.rmtree(self.dir / ".hypothesis", ignore_errors=True)
        args = self.pytest_args(tests)
        if self.runner == "fork":
            assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
            req = {"args": args, "timeout": timeout, "log": str(self.log), "code": code}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            if not reply:
                raise RuntimeError("the fork server stopped")
            res = json.loads(reply)
        else:
            t0 = time.perf_counter()
            cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "pytest", *args]
            with open(self.log, "w") as fh:
                p = subprocess.Popen(cmd, cwd=self.dir, env=self.env,
                                     stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc: int | None = p.wait(timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    rc, timed_out = None, True
            res = {"rc": rc, "seconds": time.perf_counter() - t0, "timed_out": timed_out}
        res["output"] = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
        return res

    def trace_lines(self, module: str, tests: list[str], timeout: float) -> set[int] | None:
        """Lines of ``module`` the tests execute (``None`` if the traced run failed or timed out)."""
        out = self.dir / ".mutation-lines.json"
        cmd = [sys.executable, "-c", _TRACE_BOOTSTRAP, str(self.dir / module), str(out), *self.pytest_args(tests)]
        try:
            p = subprocess.run(cmd, cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if p.returncode != 0 or not out.exists():
            return None
        return set(json.loads(out.read_text()))

    def write_module(self, module: str, text: str) -> None:
        path = self.dir / module
        tmp = path.with_suffix(".py.mutation-tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        cache = path.parent / "__pycache__"
        if cache.exists():
            for pyc in cache.glob(path.stem + ".*.pyc"):
                pyc.unlink(missing_ok=True)

    def imported_dpbr(self) -> str:
        """Where ``import dpbr`` resolves in the copy, under the runner (must be the copy)."""
        code = ("import sys, os; sys.path.insert(0, os.getcwd()); import dpbr; "
                "print('DPBR=' + os.path.realpath(dpbr.__file__))")
        out = self.run_tests([], timeout=120, code=code)["output"]
        return next((ln[5:] for ln in out.splitlines() if ln.startswith("DPBR=")), out[-500:])

    def close(self) -> None:
        if self.proc is not None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def _killed_by(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0][:160]
    return ""


# ----------------------------------------------------------------------------------------------- #
# Cache, selection, report


class Cache:
    """Append-only JSON lines of mutant results; the last line per id wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.rows: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption
                self.rows[row["id"]] = row
        path.parent.mkdir(parents=True, exist_ok=True)

    def get(self, mid: str, fingerprint: str, tests: list[str]) -> dict[str, Any] | None:
        """The cached result of mutant ``mid`` if it still holds for these test files: a kill while the
        files that killed it are still run, any result while the test files are unchanged."""
        row = self.rows.get(mid)
        if row is None:
            return None
        if row.get("tests_fingerprint") == fingerprint:
            return row
        if row["status"] == "killed" and set(row.get("tests", [])) <= set(tests):
            return row
        return None

    def put(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.rows[row["id"]] = row
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def _parse_ranges(spec: str | None) -> list[tuple[int, int]] | None:
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi or lo)))
    return out


def _tests_for(module: str, override: list[str] | None) -> list[str]:
    mapped = next((tests for pattern, tests in TESTS if fnmatch.fnmatch(module, pattern)), [])
    names = override if override else mapped + EXTRA_TESTS
    return [t for t in dict.fromkeys(names) if (ROOT / t).exists()]


def _modules(patterns: list[str]) -> list[str]:
    """Module paths (relative to the root) matching ``patterns``, ``__init__.py`` left out of globs."""
    out: list[str] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            out += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pat) if p.name != "__init__.py")
        else:
            out.append(pat)
    return list(dict.fromkeys(out))


def _fingerprint(tests: list[str]) -> str:
    h = hashlib.sha256()
    for t in [*tests, "tests/conftest.py", "pyproject.toml"]:
        p = ROOT / t
        h.update(t.encode() + b"\0" + (p.read_bytes() if p.exists() else b""))
    return h.hexdigest()[:16]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _survivor_keys(reports: list[Path]) -> set[tuple[str, ...]]:
    """Keys of the mutants that were not killed in earlier ``--out`` reports (``PREFIX.json``): module,
    function, operator, original and replacement text, and the source line when the report has it."""
    keys: set[tuple[str, ...]] = set()
    for path in reports:
        for r in json.loads(path.read_text())["results"]:
            if r["status"] != "killed":
                key = (r["module"], r["function"], r["operator"], r["original"], r["replacement"])
                keys.add(key + ((r["context"],) if r.get("context") else ()))
    return keys


def _context(m: Mutant, source: str) -> str:
    return source.splitlines()[m.line - 1].strip()


def select(all_mutants: list[Mutant], args: argparse.Namespace, source: str = "") -> list[Mutant]:
    """Filter by ``--id``/``--rerun``/``--lines``/``--function``/``--operator``, then ``--sample``
    (seeded) and ``--max-mutants``."""
    ranges = _parse_ranges(args.lines)
    again = _survivor_keys(args.rerun) if args.rerun else None
    chosen = [m for m in all_mutants
              if (ranges is None or any(lo <= m.line <= hi for lo, hi in ranges))
              and (not args.function or any(fnmatch.fnmatch(m.function, pat) for pat in args.function))
              and (not args.operator or m.operator in args.operator)
              and (not args.id or any(m.id.startswith(i) for i in args.id))
              and (again is None or (m.module, m.function, m.operator, m.original, m.replacement) in again
                   or (m.module, m.function, m.operator, m.original, m.replacement, _context(m, source)) in again)]
    if args.sample is not None and args.sample < len(chosen):
        rnd = random.Random(f"{args.seed}")
        chosen = sorted(rnd.sample(chosen, args.sample), key=lambda m: (m.module, m.line, m.col))
    if args.max_mutants is not None:
        chosen = chosen[:args.max_mutants]
    return chosen


STATUSES = ["killed", "survived", "timeout", "uncovered", "error"]


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The Markdown report: the table per module and the survivors (file:line, function, mutation)."""
    lines = ["# Mutation testing", "",
             f"{meta['date']} · commit `{meta['commit']}`{' (uncommitted changes)' if meta['dirty'] else ''} · "
             f"runner {meta['runner']} · command `{meta['command']}`", "",
             "Test files present: " + ", ".join(f"`{Path(t).name}`" for t in meta.get("test_files_present", [])), "",
             "| module | mutants | killed | survived | timeout | uncovered | error | score |",
             "|---|---|---|---|---|---|---|---|"]
    modules = sorted({r["module"] for r in results})
    total = {s: 0 for s in STATUSES}
    for mod in modules:
        rows = [r for r in results if r["module"] == mod]
        c = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        for s in STATUSES:
            total[s] += c[s]
        lines.append(_row(mod, len(rows), c))
    if len(modules) > 1:
        lines.append(_row("**all**", len(results), total))
    lines += ["", "Score = (killed + timeout) / all mutants run (uncovered ones count as survivors). "
              "Test files per module:", ""]
    for mod in modules:
        lines.append(f"- `{mod}`: " + ", ".join(f"`{t}`" for t in meta["tests"].get(mod, [])))
    surv = [r for r in results if r["status"] in ("survived", "uncovered", "timeout", "error")]
    if surv:
        lines += ["", "| where | function | status | operator | mutation |", "|---|---|---|---|---|"]
        for r in sorted(surv, key=lambda r: (r["module"], r["line"], r["col"])):
            m = Mutant(**{k: r[k] for k in Mutant.__dataclass_fields__})
            what = m.describe().replace("|", "\\|")
            lines.append(f"| `{r['module']}:{r['line']}` | `{r['function']}` | {r['status']} | {r['operator']} "
                         f"| {what} |")
    return "\n".join(lines) + "\n"


def _row(name: str, n: int, c: dict[str, int]) -> str:
    score = (c["killed"] + c["timeout"]) / n if n else float("nan")
    return (f"| {name if name.startswith('*') else '`' + name + '`'} | {n} | {c['killed']} | {c['survived']} | "
            f"{c['timeout']} | {c['uncovered']} | {c['error']} | {score:.0%} |")


# ----------------------------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", action="append", help="module path or glob to mutate (repeatable; default: "
                    + ", ".join(DEFAULT_MODULES) + ")")
    ap.add_argument("--lines", help="only mutants starting on these lines, e.g. 440-600 or 120-140,450-590")
    ap.add_argument("--function", action="append", help="only mutants in functions matching this glob of the "
                    "qualified name, e.g. 'Simulation._run' or 'LogisticGradients.*' (repeatable)")
    ap.add_argument("--operator", action="append", help="only these operators (arith, compare, boolop, const, "
                    "negate-cond, not-drop, neg-drop, call-name, arg-swap, kwarg-drop, inplace-link-drop, stmt-drop)")
    ap.add_argument("--id", action="append", help="only the mutant(s) with this id (or id prefix; repeatable)")
    ap.add_argument("--rerun", action="append", type=Path, help="only the mutants not killed in this earlier "
                    "report (PREFIX.json; repeatable), matched by module, function, mutation and source line")
    ap.add_argument("--sample", type=int, help="a seeded random subset of this many mutants per module (after the filters)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    ap.add_argument("--max-mutants", type=int, help="at most this many mutants per module (after --sample)")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy (default 1)")
    ap.add_argument("--tests", action="append", help="test files to run instead of the module's mapping")
    ap.add_argument("--runner", choices=["fork", "subprocess"], default="fork" if hasattr(os, "fork") else "subprocess")
    ap.add_argument("--timeout-factor", type=float, default=3.0, help="mutant timeout = factor × baseline (3)")
    ap.add_argument("--min-timeout", type=float, default=10.0, help="lower bound of the mutant timeout, s (10)")
    ap.add_argument("--no-coverage-filter", action="store_true", help="run mutants on lines the tests never execute")
    ap.add_argument("--cache", type=Path, default=ROOT / "results" / "mutation" / "cache.jsonl")
    ap.add_argument("--out", type=Path, help="write PREFIX.md and PREFIX.json (default results/mutation/report)")
    ap.add_argument("--list", action="store_true", help="list the selected mutants and exit")
    ap.add_argument("--report-only", action="store_true",
                    help="report the cached results of the selection; run nothing")
    ap.add_argument("--keep-scratch", action="store_true", help="keep the scratch copies (for debugging)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        _serve()
        return 0
    modules = _modules(args.module or DEFAULT_MODULES)
    for mod in modules:
        if not (ROOT / mod).is_file():
            ap.error(f"--module: {mod} is not a file under {ROOT}")
    out_prefix = args.out or ROOT / "results" / "mutation" / "report"

    selected: dict[str, list[Mutant]] = {}
    sources: dict[str, str] = {}
    for mod in modules:
        sources[mod] = (ROOT / mod).read_text()
        selected[mod] = select(mutants_of(mod, sources[mod]), args, sources[mod])
    if args.list:
        for mod, ms in selected.items():
            for m in ms:
                print(f"{m.id}  {mod}:{m.line}  {m.function}  {m.operator:18s} {m.describe()}")
        print(f"{sum(map(len, selected.values()))} mutants", file=sys.stderr)
        return 0

    cache = Cache(args.cache)
    tests = {mod: _tests_for(mod, args.tests) for mod in modules}
    prints = {mod: _fingerprint(tests[mod]) for mod in modules}
    results: list[dict[str, Any]] = []
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": _git("rev-parse", "--short", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--", *modules)), "runner": args.runner,
            "command": "python bench/mutation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "tests": tests,
            "test_files_present": sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")),
            "baseline_seconds": {}, "timeout_seconds": {}}

    todo = {mod: [m for m in ms if cache.get(m.id, prints[mod], tests[mod]) is None] for mod, ms in selected.items()}
    workers: list[Worker] = []
    try:
        if not args.report_only and any(todo.values()):
            workers = [Worker(i, args.runner, args.keep_scratch) for i in range(max(1, args.jobs))]
            where = workers[0].imported_dpbr()
            if not where.startswith(str(workers[0].dir.resolve())):
                print(f"error: dpbr imports from {where}, not from the scratch copy", file=sys.stderr)
                return 2
            for mod in modules:
                if todo[mod]:
                    if not tests[mod]:
                        print(f"skip {mod}: no test files", file=sys.stderr)
                        continue
                    prints[mod] = _run_module(mod, todo[mod], sources[mod], tests[mod], prints[mod], workers, cache,
                                              args, meta)
    except KeyboardInterrupt:
        print("interrupted: the cache keeps what ran; rerun the same command to continue", file=sys.stderr)
    finally:
        for w in workers:
            w.close()
    for mod, ms in selected.items():
        for m in ms:
            row = cache.get(m.id, prints[mod], tests[mod])
            if row is not None:
                results.append(row)
    md = report(results, meta)
    print(md)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix, body in ((".md", md), (".json", json.dumps({"meta": meta, "results": results}, indent=1))):
        tmp = out_prefix.with_name(out_prefix.name + suffix + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, out_prefix.with_name(out_prefix.name + suffix))
    missing = sum(map(len, selected.values())) - len(results)
    if missing:
        print(f"{missing} selected mutants have no result yet", file=sys.stderr)
    return 0


def _run_module(mod: str, mutants: list[Mutant], source: str, tests: list[str], fingerprint: str,
                workers: list[Worker], cache: Cache, args: argparse.Namespace, meta: dict[str, Any]) -> str:
    """Run the mutants of one module; returns the fingerprint of the test files used (``tests`` loses
    the files that fail unmutated)."""
    for w in workers:
        w.write_module(mod, source)
    base = workers[0].run_tests(tests, timeout=3600)
    if base["rc"] != 0:
        # a test file broken in the working tree (e.g. mid-edit) must not hide the others
        passing = [t for t in tests if workers[0].run_tests([t], timeout=3600)["rc"] == 0]
        dropped = [t for t in tests if t not in passing]
        print(f"{mod}: the unmutated tests fail in {', '.join(dropped)} (rc {base['rc']}); left out:\n"
              f"{base['output'][-1500:]}", file=sys.stderr)
        meta.setdefault("tests_dropped", {})[mod] = dropped
        if not passing:
            print(f"skip {mod}: no test file passes unmutated", file=sys.stderr)
            return fingerprint
        tests[:] = passing
        fingerprint = _fingerprint(tests)
        base = workers[0].run_tests(tests, timeout=3600)
    timeout = max(args.timeout_factor * base["seconds"], args.min_timeout)
    meta["baseline_seconds"][mod] = round(base["seconds"], 2)
    meta["timeout_seconds"][mod] = round(timeout, 1)
    covered: set[int] | None = None
    if not args.no_coverage_filter:
        covered = workers[0].trace_lines(mod, tests, timeout=max(10 * base["seconds"], 120))
        if covered is None:
            print(f"{mod}: line tracing failed; running every mutant", file=sys.stderr)
    print(f"{mod}: {len(mutants)} mutants to run; tests {' '.join(tests)}; baseline {base['seconds']:.1f} s, "
          f"timeout {timeout:.0f} s", file=sys.stderr)
    free: list[Worker] = list(workers)
    free_lock = threading.Lock()
    counter = {"done": 0}

    def one(m: Mutant) -> None:
        row: dict[str, Any] = {**dataclasses.asdict(m), "tests_fingerprint": fingerprint, "tests": tests,
                               "context": source.splitlines()[m.line - 1].strip()}
        if covered is not None and not any(ln in covered for ln in range(m.line, m.end_line + 1)):
            row.update(status="uncovered", seconds=0.0, killed_by="")
        else:
            with free_lock:
                w = free.pop()
            try:
                w.write_module(mod, apply(source, m))
                res = w.run_tests(tests, timeout)
            finally:
                w.write_module(mod, source)
                with free_lock:
                    free.append(w)
            rc = res["rc"]
            status = ("timeout" if res["timed_out"] else "survived" if rc == 0
                      else "error" if rc in (4, 5) else "killed")
            row.update(status=status, seconds=round(res["seconds"], 2), rc=rc, killed_by=_killed_by(res["output"]))
        cache.put(row)
        counter["done"] += 1
        print(f"[{counter['done']}/{len(mutants)}] {row['status']:9s} {mod}:{m.line} {m.operator} {m.describe()}"
              f" ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)

    if len(workers) == 1:
        for m in mutants:
            one(m)
    else:
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(one, mutants))
    return fingerprint


if __name__ == "__main__":
    sys.exit(main())
