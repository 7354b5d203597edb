"""Running a sweep: every point of the grid (``raysens.run.grid``) through the one runner.

    from raysens.run.grid import load_sweep
    from raysens.run.sweep import run_sweep
    summary = run_sweep(load_sweep("jobs/configs/sweep_tiny_10k.yaml"))  # raysens sweep CONFIG

Layout::

    <dir>/sweep.json                      the points (name, axes, fingerprint, status, samples, and a
                                          planned point's plan: ``planning.plan_summary``), timings,
                                          driver memory, model loads per model; ``history``: the same
                                          figures of earlier invocations (restarts)
    <dir>/<model>__S<S>__<data>__<est>/   one ordinary run directory per point (raysens.load_run,
                                          raysens report/show work on it; raysens report <dir>
                                          reports the whole sweep)
    <dir>/corpus/…                        the generated corpus, when ``corpus`` is given

How it runs: all points are validated and their run directories opened first (nothing is computed
when one point is invalid). Points whose manifest says ``complete`` with the same fingerprint are
skipped; the others resume from their own partials. Then the runner (``raysens.run.runner``) makes
ONE pass per model over one actor pool for all that model's unfinished points: each actor loads the
weights once; each point is finalized as soon as its last unit has arrived. Ray is initialised once
for the whole sweep. With ``cluster.use_ray: false`` the same happens in this process.

Planned points (``sensitivity.target_rel_se``/``budget``, docs/DESIGN.md §1.11): each point is
planned on its own, by the runner's ``attach_plan`` before the backend starts: one pilot per point
and one ``plan.json`` in its run directory; a restart reuses every unfinished point's ``plan.json``.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass

from .._log import log, now_iso
from ..errors import RaysensError
from ..store import results
from ..store.rundir import diff_inputs
from .grid import Point, Sweep, expand, prepare_corpus, with_corpus
from .monitor import MemoryMonitor
from .planning import plan_summary
from .runner import Job, Runner

__all__ = ["SweepError", "SweepSummary", "run_sweep"]


class SweepError(RaysensError, RuntimeError):
    """The sweep cannot start or some of its points failed; the message names them."""


@dataclass
class SweepSummary:
    dir: str
    manifest: dict  # what was written to <dir>/sweep.json

    @property
    def points(self) -> list[dict]:
        return self.manifest["points"]

    def run_dir(self, name: str) -> str:
        return posixpath.join(self.dir, name)

    def load(self, name: str):
        return results.load_run(self.run_dir(name))


def run_sweep(sweep: Sweep, use_ray: bool | None = None) -> SweepSummary:
    """Run every unfinished point (see the module doc). ``use_ray`` defaults to ``base.cluster.use_ray``."""
    t0 = time.perf_counter()
    started = now_iso()
    _INPUTS.clear()  # identities are recomputed by every invocation
    corpus = prepare_corpus(sweep)
    sweep = with_corpus(sweep, corpus)
    points = expand(sweep)
    use_ray = points[0].config.cluster.use_ray if use_ray is None else use_ray
    status: dict[str, dict] = {}
    smanifest = {"format": "raysens-sweep/2", "name": sweep.name, "dir": sweep.dir, "status": "running",
                 "config": sweep.raw, "corpus": corpus, "timings": {"started": started}, "points": [],
                 "history": _history(sweep)}

    def write() -> None:
        smanifest["points"] = [_point_entry(p, status[p.name]) for p in points]
        _write_sweep(sweep, smanifest)

    def on_change(job: Job) -> None:
        st = status[job.name]
        st["status"] = job.status
        if job.manifest.get("plan"):  # a planned point: its own plan (made by its pilot or read from its plan.json)
            st["plan"] = plan_summary(job.manifest["plan"], job.plan_source)
        if job.status == "complete":
            st.update(samples=_samples(job.final), wall_s=job.final["timings"]["wall_s"])
            s = job.final["samples"]
            print(f"point {job.name}: {s['computed']} samples computed, {s['skipped']} skipped -> "
                  f"{job.prepared.run_dir}", flush=True)
        elif job.status in ("failed", "incomplete"):
            st["error"] = job.error
            if job.status == "incomplete":
                st["missing_units"] = len(job.rdir.todo())
        write()

    mem = MemoryMonitor()
    runner = Runner(use_ray, on_change=on_change,
                    on_unit=lambda done: mem.mark(done) if _mark_due(mem, done, total) else None)
    # validate everything and open every run directory before computing anything
    for p in points:
        m = _read_manifest(p.config.output.dir)
        if m.get("status") == "complete" and m.get("fingerprint") == p.config.fingerprint():
            changed = diff_inputs(m["inputs"], _inputs(p.config, use_ray)) if isinstance(m.get("inputs"), dict) else []
            if changed:
                runner.close()
                raise SweepError(f"point {p.name}: output directory {p.config.output.dir!r} was computed from other "
                                 f"inputs: {'; '.join(changed)}; restore the inputs or use another dir "
                                 "(nothing was changed)")
            status[p.name] = {"status": "complete", "this_run": "skipped (already complete)", "samples": _samples(m)}
            if m.get("plan"):
                status[p.name]["plan"] = plan_summary(m["plan"])
            continue
        try:
            job = runner.open(p.name, p.config, started,
                              {"sweep": {"dir": sweep.dir, "point": p.name, "axes": p.axes}})
        except Exception as exc:
            runner.close()  # release the leases of the points already opened
            raise SweepError(f"point {p.name}: {exc}") from exc
        status[p.name] = {"status": "pending", "this_run": "resumed" if job.rdir.done else "new"}
    total = sum(j.prepared.n_selected for j in runner.jobs)
    n_skipped = len(points) - len(runner.jobs)
    log(f"sweep {sweep.name}: {len(points)} points ({n_skipped} already complete, {len(runner.jobs)} to run, "
        f"{runner.todo_samples} samples to compute) -> {sweep.dir}")
    write()
    try:
        with mem:
            runner.run(runner.jobs[0].config.output.progress_every_s if runner.jobs else 5.0)
            mem.mark(runner.progress.done)
    except BaseException as exc:
        smanifest.update(status="interrupted", error=f"{type(exc).__name__}: {exc}", groups=runner.groups,
                         driver_memory=mem.summary())
        write()
        raise
    failures = [f"{j.name}: {j.error}" for j in runner.jobs if j.status != "complete"]
    wall = time.perf_counter() - t0
    computed = sum((st.get("samples") or {}).get("computed") or 0 for st in status.values())
    this_run = runner.progress.done - runner.progress.start
    smanifest.update(
        status="complete" if not failures else "failed", groups=runner.groups,
        samples={"computed_all_points": computed, "computed_this_run": this_run},
        timings={"started": started, "finished": now_iso(), "wall_s": round(wall, 3),
                 "samples_per_s_this_run": round(this_run / wall, 3) if wall else None},
        driver_memory=mem.summary(), backend="ray" if use_ray else "local")
    write()
    log(f"sweep {sweep.name}: {len(points) - len(failures)}/{len(points)} points complete in {wall:.1f}s; "
        f"driver peak RSS {mem.peak_mb:.0f} MiB -> {sweep.dir}/sweep.json")
    if failures:
        raise SweepError(f"{len(failures)} point(s) did not complete (rerun the sweep to retry them): "
                         + "; ".join(failures))
    return SweepSummary(sweep.dir, smanifest)


_INPUTS: dict = {}  # ("model", model, use_ray) / ("corpus", data config) -> identity, once per sweep invocation


def _inputs(config, use_ray: bool) -> dict:
    """The content identity a point's manifest records (``run/prepare.py: prepare``), memoised: a
    sweep's points share their corpus and models. The corpus is identified here; the model in this
    process only for an in-process sweep: a Ray sweep's driver reads no weight file (issue 31; a
    KubeRay head mounts no model volume), so its model identity comes from ``_worker_identity``."""
    from ..corpus.reader import Corpus

    mkey = ("model", config.model.name, config.model.trust_remote_code, bool(use_ray))
    if mkey not in _INPUTS:  # one per model, whatever the points' data
        if use_ray:
            _INPUTS[mkey] = _worker_identity(config)
        else:
            from ..core.models.identity import model_identity

            _INPUTS[mkey] = model_identity(config.model.name, trust_remote_code=config.model.trust_remote_code)
    ckey = ("corpus", repr(config.data))
    if ckey not in _INPUTS:
        _INPUTS[ckey] = Corpus(config.data).identity()
    return {"corpus": _INPUTS[ckey], "model": _INPUTS[mkey]}


def _worker_identity(config) -> dict:
    """The model's content identity computed where the weights are, as a Ray run's is
    (``run/planning.py: prepare_model_side``): one Ray task with a pool actor's resources
    (``backends.remote.on_worker``), in a Ray session joined (or started) for it."""
    from .. import backends
    from ..backends.remote import on_worker
    from ..core.models.identity import checked_identity

    m = config.model
    with backends.session(config.cluster, use_ray=True):
        return on_worker(config.cluster, m.device, checked_identity, m.name, trust_remote_code=m.trust_remote_code)


def _mark_due(mem: MemoryMonitor, done: int, total: int) -> bool:
    """Record the driver's RSS about 20 times over the sweep."""
    return not mem.points or done - mem.points[-1]["samples"] >= max(total // 20, 1)


def _samples(m: dict) -> dict:
    s = m.get("samples", {})
    return {k: s.get(k) for k in ("total", "computed", "skipped")}


def _point_entry(p: Point, st: dict) -> dict:
    return {"name": p.name, "run_dir": p.config.output.dir, "axes": p.axes, "layers": list(p.config.layers),
            "fingerprint": p.config.fingerprint(), **st}


def _read_manifest(run_dir: str) -> dict:
    fs, base = results.resolve(run_dir)
    if not results.exists(fs, posixpath.join(base, "manifest.json")):
        return {}
    try:
        return results.read_manifest(run_dir)
    except ValueError:
        return {}


def _history(sweep: Sweep) -> list[dict]:
    """Earlier invocations of this sweep (from its sweep.json): what each computed, how fast, memory."""
    old = _read_json(posixpath.join(sweep.dir, "sweep.json"))
    if not old.get("timings"):
        return []
    keep = ("status", "timings", "samples", "backend", "groups", "driver_memory", "error")
    return old.get("history", []) + [{k: old[k] for k in keep if k in old}]


def _read_json(path: str) -> dict:
    fs, inner = results.resolve(path)
    if not results.exists(fs, inner):
        return {}
    try:
        return json.loads(results.read_bytes(fs, inner))
    except ValueError:
        return {}


def _write_sweep(sweep: Sweep, m: dict) -> None:
    fs, base = results.resolve(sweep.dir)
    results.write_bytes(fs, posixpath.join(base, "sweep.json"), json.dumps(m, indent=1, default=str).encode())
