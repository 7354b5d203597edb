"""No function of ``raysens`` takes more than ``MAX_PARAMS`` parameters (issue 28): what belongs
together travels as one object (``cotangents.PassData``, ``planner.CostShape`` / ``Objective``,
``sizing.Workload``, ``pilot.PilotSamples``, ``units.WorkerSpec``, ``rundir.RunIdentity``), not as
9-13 loose arguments. A static ``ast`` scan in the style of ``test_layering.py``: every ``def`` and
``lambda``, nested ones included; ``self``/``cls`` do not count, ``*args``/``**kwargs`` count one each.

Excepted, and only these:
- compiled kernels: a ``numba`` decorator, or a name in a module's ``_COMPILED`` tuple (``stats/kernel.py``
  wraps those with ``numba.njit`` at first use): their arguments are arrays by design;
- the public functions and methods of ``raysens/compat.py``: the older tool's signatures, kept as they were.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "raysens"
MAX_PARAMS = 8
COMPAT = "compat.py"  # relative to PACKAGE: its public names keep the older tool's signatures


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> list[str]:
    a = fn.args
    names = [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    if names and names[0] in ("self", "cls") and not isinstance(fn, ast.Lambda):
        names = names[1:]
    return names


def _decorated_compiled(fn) -> bool:
    return any("jit" in ast.unparse(d) or "numba" in ast.unparse(d) for d in getattr(fn, "decorator_list", []))


def _compiled_names(tree: ast.Module) -> set[str]:
    """The names in a module-level ``_COMPILED = ("a", "b", ...)`` (functions jitted at run time)."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_COMPILED" for t in node.targets):
            out |= {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
    return out


def _counts(source: str, keep_public: bool = True) -> dict[str, int]:
    """``{function name (lambda: "<lambda>@line"): parameters}`` of every non-compiled function;
    ``keep_public=False`` leaves out the public (not ``_``-prefixed) named functions (compat.py)."""
    tree = ast.parse(source)
    jitted = _compiled_names(tree)
    out = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Lambda):
            name = f"<lambda>@{node.lineno}"
        else:
            name = node.name
            if _decorated_compiled(node) or name in jitted or (not keep_public and not name.startswith("_")):
                continue
        out[name] = max(out.get(name, 0), len(_params(node)))
    return out


def _over(top: Path) -> dict[str, int]:
    """``{"path relative to top:function": parameters}`` of the functions over ``MAX_PARAMS``."""
    out = {}
    for p in sorted(top.rglob("*.py")):
        rel = p.relative_to(top).as_posix()
        for name, n in _counts(p.read_text(), keep_public=rel != COMPAT).items():
            if n > MAX_PARAMS:
                out[f"{rel}:{name}"] = n
    return out


def test_the_counter_counts():
    # guards against a scan that counts nothing (the check below would then pass vacuously)
    src = ("class C:\n    def m(self, a, b, *c, d, **e): pass\n"
           "def f(a, /, b, c=1, *, d): pass\n"
           "g = lambda x, y: x\n"
           "@numba.njit\ndef k(a, b, c, d, e, f, g, h, i, j): pass\n"
           "_COMPILED = ('r',)\ndef r(a, b, c, d, e, f, g, h, i, j): pass\n"
           "def _p(a, b, c, d, e, f, g, h, i, j): pass\n"
           "def q(a, b, c, d, e, f, g, h, i): pass\n")
    assert _counts(src) == {"m": 5, "f": 4, "<lambda>@4": 2, "_p": 10, "q": 9}
    assert _counts(src, keep_public=False) == {"<lambda>@4": 2, "_p": 10}
    # the exceptions are real: without them the scan finds the kernels and compat's old signature
    kernel = (PACKAGE / "stats" / "kernel.py").read_text()
    assert {"_update", "_hist_add"} <= _compiled_names(ast.parse(kernel))
    assert _counts((PACKAGE / COMPAT).read_text())["compute_position_jacobian"] > MAX_PARAMS
    assert "compute_position_jacobian" not in _counts((PACKAGE / COMPAT).read_text(), keep_public=False)
    # the scan reaches every subpackage
    assert {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")} >= {"core", "backends", "store", "run", "stats"}


def test_no_function_takes_more_than_eight_parameters():
    over = _over(PACKAGE)
    assert not over, (f"functions with more than {MAX_PARAMS} parameters (group what belongs together in a "
                      f"frozen dataclass): {over}")
