"""The layout of ``jobs/``: entrypoints run by path (``python jobs/run.py CONFIG``); benchmarks
(``jobs/bench``), experiments (``jobs/experiments``), checks (``jobs/checks``) and tools as modules of
the ``jobs`` package (``python -m jobs.bench.benchmark ...``); no ``sys.path`` edits; one harness
(``jobs/harness.py``: child processes, JSON, RSS, log, corpus) that imports nothing heavy, engine
helpers only in ``jobs/bench/common.py``, and no import circles: a benchmark module imports the
harness, ``common`` and nothing else of ``jobs``, except the dispatcher ``benchmark``, which imports
the mode modules. Each module's docstring lists its launch commands."""

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
# one concern per folder: what each holds (``python -m jobs.<folder>.<module>``)
FOLDERS = {"bench": BENCH, "experiments": ["paired_variance", "planner", "probe_choice"], "checks": ["gpu_check"]}
DISPATCHER_IMPORTS = {"actors", "common", "corpus", "cpu", "generic", "gpu", "modes", "pipeline", "precision",
                      "rundir", "strategies"}


def _py_files():
    return sorted(JOBS.rglob("*.py"))


def _jobs_imports(path: Path) -> set[str]:
    """Modules of ``jobs.bench`` that ``path`` imports (relative or absolute), by stem; ``harness`` for
    ``jobs.harness``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:  # from .x import y / from . import x, y
                out |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif mod == "jobs.harness":
                out.add("harness")
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
    for folder in FOLDERS:
        assert (JOBS / folder / "__init__.py").is_file(), folder
    assert (JOBS / "__init__.py").is_file()
    assert not list(JOBS.glob("bench_*.py")) and not (JOBS / "benchmark.py").exists()


def test_benchmark_modules_import_only_the_harness_and_common_and_the_dispatcher_only_modes():
    assert "common" in BENCH and "benchmark" in BENCH
    for stem in BENCH:
        got = _jobs_imports(JOBS / "bench" / f"{stem}.py")
        allowed = DISPATCHER_IMPORTS if stem == "benchmark" else {"common"} if stem != "common" else set()
        allowed = allowed | {"harness"}
        assert got <= allowed, f"jobs/bench/{stem}.py imports {sorted(got - allowed)} of jobs.bench"
        if stem != "common":
            assert "benchmark" not in got


def test_folders_hold_what_they_say_and_share_the_harness():
    for folder, stems in FOLDERS.items():
        here = sorted(p.stem for p in (JOBS / folder).glob("*.py") if p.stem != "__init__")
        assert here == sorted(stems), f"jobs/{folder}: {here}"
    for p in _py_files():
        if p.parent.name in ("experiments", "checks"):
            got = _jobs_imports(p)
            assert got <= {"harness", "common"}, f"{p.relative_to(ROOT)} imports {sorted(got)} of jobs"


def test_one_harness_no_private_spawners_loggers_or_samplers():
    """Child processes, JSON, RSS sampling, logging and the synthetic corpus are the harness's alone."""
    top = set()  # what importing the harness loads (its module-level imports)
    for node in ast.parse((JOBS / "harness.py").read_text()).body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    heavy = top & {"torch", "numpy", "ray", "raysens", "psutil"}
    assert not heavy, f"jobs/harness.py imports {heavy}: a child's RSS and imports would change"
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, sorted(top - set(sys.stdlib_module_names))
    for p in _py_files():
        if p.name == "harness.py" or p.parent.name == "tools" or p.parent == JOBS:
            continue
        src = p.read_text()
        for needle in ("subprocess.", "def log(", "def _log(", "def _corpus(", "def _rss", "json.dumps(res, indent",
                       "threading.Thread(target=sample", "resource.getrusage"):
            assert needle not in src, f"{p.relative_to(ROOT)}: `{needle}` belongs to jobs.harness"


@pytest.mark.parametrize("folder,stem", [(f, s) for f, stems in FOLDERS.items() for s in stems if s != "common"])
def test_module_docstrings_list_their_launch_commands(folder, stem):
    doc = ast.get_docstring(ast.parse((JOBS / folder / f"{stem}.py").read_text()))
    want = "python -m jobs.bench.benchmark" if stem in ("cpu", "gpu") else f"python -m jobs.{folder}.{stem}"
    assert doc and want in doc, f"jobs/{folder}/{stem}.py: docstring should show `{want} ...`"
    assert "python jobs/" not in doc, f"jobs/{folder}/{stem}.py: stale launch path in its docstring"


def test_entrypoint_docstrings_list_their_launch_commands():
    for name in ENTRYPOINTS:
        doc = ast.get_docstring(ast.parse((JOBS / name).read_text()))
        assert f"python jobs/{name}" in doc, name


@pytest.mark.parametrize("module", ["jobs.bench.benchmark", "jobs.bench.strategies", "jobs.bench.pipeline",
                                    "jobs.bench.corpus", "jobs.bench.rundir", "jobs.bench.generic", "jobs.bench.scale",
                                    "jobs.bench.forward_rate", "jobs.bench.memory_model", "jobs.bench.driver_rss",
                                    "jobs.bench.load_rss", "jobs.bench.actors", "jobs.bench.driver_s512",
                                    "jobs.bench.subunits", "jobs.bench.tree_merge", "jobs.bench.overlap",
                                    "jobs.bench.overlap_pieces", "jobs.bench.fusion", "jobs.bench.length_units", "jobs.bench.packing",
                                    "jobs.experiments.probe_choice", "jobs.experiments.planner",
                                    "jobs.checks.gpu_check", "jobs.tools.make_corpus"])
def test_modules_answer_help_from_the_repository_root(module):
    p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"python -m {module}" in p.stdout
