"""The layout of ``jobs/``: entrypoints run by path (``python jobs/run.py CONFIG``), benchmarks and
tools as modules of the ``jobs`` package (``python -m jobs.bench.benchmark ...``), no ``sys.path``
edits, shared benchmark helpers only in ``jobs/bench/common.py``, and no import circles: a benchmark
module imports ``common`` and nothing else of ``jobs``, except the dispatcher ``benchmark``, which
imports the mode modules. Each module's docstring lists its launch commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
JOBS = ROOT / "jobs"
ENTRYPOINTS = ["run.py", "sweep.py", "quickstart.py"]
BENCH = sorted(p.stem for p in (JOBS / "bench").glob("*.py") if p.stem != "__init__")
DISPATCHER_IMPORTS = {"actors", "common", "corpus", "cpu", "generic", "gpu", "modes", "pipeline", "precision",
                      "rundir", "strategies"}


def _py_files():
    return sorted(JOBS.rglob("*.py"))


def _jobs_imports(path: Path) -> set[str]:
    """Modules of ``jobs.bench`` that ``path`` imports (relative or absolute), by stem."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:  # from .x import y / from . import x, y
                out |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif mod.startswith("jobs."):
                out.add(mod.split(".")[2] if mod.count(".") >= 2 else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("jobs.bench.")}
    return out


def test_no_sys_path_edits_in_jobs():
    offenders = [str(p.relative_to(ROOT)) for p in _py_files() if "sys.path" in p.read_text()]
    assert not offenders, f"sys.path edited in {offenders}: run benchmarks as python -m jobs.bench.<module>"


def test_entrypoints_stay_where_deploy_and_ray_job_submit_expect_them():
    for name in ENTRYPOINTS:
        assert (JOBS / name).is_file(), name
    assert (JOBS / "__init__.py").is_file() and (JOBS / "bench" / "__init__.py").is_file()
    assert not list(JOBS.glob("bench_*.py")) and not (JOBS / "benchmark.py").exists()


def test_benchmark_modules_import_only_common_and_the_dispatcher_only_modes():
    assert "common" in BENCH and "benchmark" in BENCH
    for stem in BENCH:
        got = _jobs_imports(JOBS / "bench" / f"{stem}.py")
        allowed = DISPATCHER_IMPORTS if stem == "benchmark" else ({"common"} if stem != "common" else set())
        assert got <= allowed, f"jobs/bench/{stem}.py imports {sorted(got - allowed)} of jobs.bench"
        if stem != "common":
            assert "benchmark" not in got


@pytest.mark.parametrize("stem", [s for s in BENCH if s != "common"])
def test_bench_docstrings_list_their_launch_commands(stem):
    doc = ast.get_docstring(ast.parse((JOBS / "bench" / f"{stem}.py").read_text()))
    want = "python -m jobs.bench.benchmark" if stem in ("cpu", "gpu") else f"python -m jobs.bench.{stem}"
    assert doc and want in doc, f"jobs/bench/{stem}.py: docstring should show `{want} ...`"
    assert "python jobs/" not in doc, f"jobs/bench/{stem}.py: stale launch path in its docstring"


def test_entrypoint_docstrings_list_their_launch_commands():
    for name in ENTRYPOINTS:
        doc = ast.get_docstring(ast.parse((JOBS / name).read_text()))
        assert f"python jobs/{name}" in doc, name


@pytest.mark.parametrize("module", ["jobs.bench.benchmark", "jobs.bench.strategies", "jobs.bench.pipeline",
                                    "jobs.bench.probe_choice", "jobs.bench.gpu_check", "jobs.bench.corpus", "jobs.bench.rundir",
                                    "jobs.bench.generic",
                                    "jobs.tools.make_corpus"])
def test_modules_answer_help_from_the_repository_root(module):
    p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"python -m {module}" in p.stdout
