"""The one harness of the benchmarks (``jobs/bench``), experiments (``jobs/experiments``) and checks
(``jobs/checks``): logging, JSON output, RSS readings and sampling, a synthetic corpus, and child
processes — each measurement in a fresh process, optionally against another checkout (A/B).

Standard library only (no torch, numpy, Ray or raysens), so that importing it changes nothing that a
child measures (its RSS, its imports).

A/B against a baseline tree: ``run_child("jobs.bench.scale:child", spec, tree=BASELINE)`` runs the
function ``child(spec)`` of *this* checkout's ``jobs`` package in a fresh interpreter whose
``raysens`` comes from ``tree`` (``PYTHONPATH=tree``, working directory ``tree``): the baseline
checkout needs neither this harness nor the benchmark. The function returns a JSON-able dict; the
child prints it on one ``RESULT {...}`` line, so that the child may log freely. ``trees`` and
``alternate`` give the order in which the trees take turns (same process alternation for both).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # this checkout's root: its jobs/ and (by default) its raysens/
RESULT = "RESULT "  # the prefix of the one line that carries a child's result
READY = "READY"  # a child prints this line (``ready()``) when the parent's RSS sampler should start


# ----------------------------------------------------------------------------- logging and JSON
def log(*a, err: bool = False) -> None:
    """Print a progress line now (stdout; ``err=True``: stderr, where stdout carries JSON)."""
    print(*a, file=sys.stderr if err else sys.stdout, flush=True)


def write_json(res, path=None, *, echo: bool = False) -> None:
    """The one JSON writer: ``res`` as indented JSON to ``path`` (``--json PATH``; nothing when None),
    and to stdout as well with ``echo=True`` (the scripts whose stdout is their result)."""
    text = json.dumps(res, indent=1, default=str)
    if echo:
        print(text, flush=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
        log(f"wrote {path}", err=echo)


def add_json_arg(ap, help: str = "also write the results here as JSON") -> None:
    ap.add_argument("--json", default=None, help=help)


def add_baseline_arg(ap) -> None:
    ap.add_argument("--baseline-tree", default=None,
                    help="another checkout (e.g. `git archive main | tar -x -C /tmp/raysens-main`) run alternately "
                         "as the baseline: its raysens, this checkout's benchmark")


# ----------------------------------------------------------------------------- RSS
def proc_status_mib(key: str = "VmRSS", pid: int | str = "self") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since exec) of a process in MiB, from ``/proc/PID/status``
    (Linux); this process's ``ru_maxrss`` where that file cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return maxrss_mib()


def maxrss_mib() -> float:
    """This process's peak RSS as ``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def thread_minflt() -> int:
    """Minor page faults of the calling thread so far (``RUSAGE_THREAD``; 0 where it is missing)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    return resource.getrusage(who).ru_minflt if who is not None else 0


def reset_peak_rss() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux; nothing elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class RssSampler:
    """The one RSS sampler: a thread reads ``VmRSS`` of ``pid`` (default this process) every ``every_s``
    seconds while the ``with`` block runs (or between ``start()`` and ``stop()``); ``peak_mib`` is the
    largest reading, ``first_mib`` the first (taken on entry)."""

    def __init__(self, pid: int | str = "self", every_s: float = 0.05):
        self.pid, self.every_s = pid, every_s
        self.first_mib = self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:  # the process has ended
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self._read()
            if v is None:
                return
            self.peak_mib = max(self.peak_mib, v)
            time.sleep(self.every_s)

    def start(self) -> "RssSampler":
        self.first_mib = self.peak_mib = self._read() or 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "RssSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------- inputs
def synthetic_corpus(path: Path, rows: int, seq: int) -> Path:
    """A text corpus of ``rows`` distinct lines long enough for ``seq`` synthetic tokens (4 characters
    each), for the ``synthetic:`` and ``random:`` models."""
    with open(path, "w") as f:
        for r in range(rows):
            f.write(f"row {r} " + "lorem ipsum dolor " * (seq // 4 + 2) + "\n")
    return Path(path)


def dir_bytes(d: Path) -> int:
    """Bytes of all files below ``d`` (files that vanish while walking count 0)."""
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# ----------------------------------------------------------------------------- child processes, A/B
def trees(baseline: str | os.PathLike | None, this: str = "this") -> dict:
    """``{"this": REPO}`` plus ``{"baseline": path}`` when a baseline tree is given (``--baseline-tree``)."""
    out = {this: REPO}
    if baseline:
        out["baseline"] = Path(baseline).resolve()
    return out


def alternate(names, rounds: int = 1):
    """``(round, name)`` for ``rounds`` rounds over ``names`` in turn (A B A B ...): the trees (or variants)
    of an A/B share the machine's load as evenly as one process at a time allows."""
    names = list(names)
    for r in range(max(1, rounds)):
        for n in names:
            yield r, n


# the child's first lines: this checkout's ``jobs`` package by file path (so the measured tree's own
# ``jobs``, if any, is not used), then the target; ``raysens`` comes from PYTHONPATH (the measured tree)
_BOOT = r"""
import importlib, importlib.util, json, sys
repo, target, spec = sys.argv[1], sys.argv[2], sys.argv[3]
s = importlib.util.spec_from_file_location("jobs", repo + "/jobs/__init__.py",
                                          submodule_search_locations=[repo + "/jobs"])
m = importlib.util.module_from_spec(s); sys.modules["jobs"] = m; s.loader.exec_module(m)
module, func = target.split(":")
res = getattr(importlib.import_module(module), func)(json.loads(spec))
print("RESULT " + json.dumps(res, default=str), flush=True)
"""


def provenance(spec=None) -> dict:
    """Where this process's ``raysens`` and ``jobs`` come from (a child's record of the tree it measured)."""
    import jobs
    import raysens

    return {"raysens": str(Path(raysens.__file__).resolve().parent), "jobs": str(Path(jobs.__file__).resolve().parent)}


def ready() -> None:
    """Called in a child: the parent's RSS sampler (``run_child(..., sample_rss=True)``) starts now."""
    print(READY, flush=True)


def child_env(tree: str | os.PathLike | None = None, env: dict | None = None, unset=()) -> dict:
    """The environment of a child measuring ``tree`` (default this checkout): ``PYTHONPATH=tree``."""
    e = {**os.environ, **(env or {}), "PYTHONPATH": str(Path(tree) if tree else REPO)}
    for k in unset:
        e.pop(k, None)
    return e


def run_child(target: str, spec=None, *, tree=None, cwd=None, env: dict | None = None, unset=(),
              timeout: float | None = None, sample_rss: bool = False, every_s: float = 0.005) -> dict:
    """The one child-process spawner: ``target`` (``"jobs.bench.module:function"``) called on ``spec``
    (JSON) in a fresh interpreter, its ``raysens`` from ``tree`` (default this checkout), run in ``cwd``
    (default ``tree``); returns the function's dict. ``env``: more variables; ``unset``: variables
    removed. ``sample_rss``: the parent samples the child's RSS every ``every_s`` s from its ``READY``
    line on (``ready()``) and adds ``sampled_peak_mb`` (0 if the child printed no ``READY``). A failed
    child raises ``RuntimeError`` with the tail of its output."""
    root = Path(tree) if tree else REPO
    cmd = [sys.executable, "-c", _BOOT, str(REPO), target, json.dumps(spec if spec is not None else {})]
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=str(cwd or root), env=child_env(root, env, unset), stdout=subprocess.PIPE,
                             stderr=err, text=True)
        sampler = None
        lines = []
        try:
            if sample_rss:
                sampler = RssSampler(p.pid, every_s)
            for line in p.stdout:
                lines.append(line)
                if sampler is not None and sampler._thread is None and line.strip() == READY:
                    sampler.start()
            p.wait(timeout=timeout)
        except BaseException:
            p.kill()
            raise
        finally:
            if sampler is not None:
                sampler.stop()
        err.seek(0)
        stderr = err.read()
    res = [json.loads(x[len(RESULT):]) for x in lines if x.startswith(RESULT)]
    if p.returncode or not res:
        raise RuntimeError(f"{target} under {root} failed (rc {p.returncode}):\n{(''.join(lines) + stderr)[-3000:]}")
    out = res[-1]
    if sampler is not None:
        out["sampled_peak_mb"] = sampler.peak_mib
    return out


def run_command(cmd: list[str], *, cwd=None, env: dict | None = None, timeout: float | None = None
                ) -> subprocess.CompletedProcess:
    """A command line (e.g. ``jobs/run.py CONFIG ...``) of this checkout in a child process; raises
    ``RuntimeError`` with the tail of its output when it fails."""
    p = subprocess.run(cmd, cwd=str(cwd or REPO), env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return p
