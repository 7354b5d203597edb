"""The one runner: open every job's run directory, compute the missing units, finalize each job.

A *job* is one run directory being computed: a plain run (``raysens run``) is one job, a sweep
(``raysens.run.sweep``) is one job per grid point. Both go through ``Runner``:

1. ``Runner.open(...)`` validates a job's config (corpus, model config, layers) and opens its run
   directory (refusing one of another config, setting corrupt partials aside) — nothing is
   computed until every job of the invocation has opened.
2. ``Runner.run()`` writes each job's ``running`` manifest, enters one backend session for the
   whole invocation (``raysens.backends.session``: Ray is joined or started once), and makes ONE
   pass per model over the backend: each actor (or this process) loads the weights once and keeps
   one worker per job over them. Each partial is persisted in its job's run directory as it
   arrives; a job is finalized (``driver.finalize``) as soon as its last unit is in.
3. A job whose units did not all arrive is reported as incomplete (rerun to compute them).

``on_change(job)`` is called whenever a job's status changes (the sweep rewrites ``sweep.json``).

Why this module is long: one runner for runs and sweeps: opening the jobs, the pass over a backend
and finalisation are one sequence with shared interrupt and error handling.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import backends
from .._log import log, now_iso
from ..config import PairedConfig, RunConfig
from ..store import results
from ..store.results import RunResult, load_run
from ..store.partials import read_meta
from ..store.rundir import RunDir, RunError
from ..testing import faults
from . import signals
from .driver import Progress, finalize
from .layout import dispatch_order
from .prepare import PreparedRun, base_manifest, check_device, open_run_dir, prepare
from .planning import prepare_model_side


def _set_hint(exc: BaseException, hint: str) -> None:
    try:
        exc.resume_hint = hint  # read by the command line (raysens.cli) for its second line
    except AttributeError:  # an exception type without a __dict__
        pass


def _interrupt_reason(exc: BaseException) -> str:
    if isinstance(exc, signals.Terminated):
        return "interrupted by SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"interrupted ({exc})"


@dataclass
class Job:
    """One run directory being computed."""

    name: str  # the run's name (a sweep point's name; the run directory's basename for a plain run)
    config: RunConfig
    prepared: PreparedRun
    rdir: RunDir
    manifest: dict  # the manifest written when the job starts; finalize completes it
    left: int  # units still to arrive
    status: str = "pending"  # pending | running | complete | failed | incomplete
    error: str | None = None  # why the job failed or is incomplete
    final: dict | None = None  # the manifest written by finalize
    started: float = 0.0  # perf_counter at the start of the job's pass
    load_ids: set = field(default_factory=set)  # model loads that computed its units
    plan_source: str | None = None  # planned jobs (planning.attach_plan): "pilot" (planned now) or "plan.json" (reused)

    @property
    def model_key(self) -> tuple:
        m = self.config.model
        return (m.name, m.trust_remote_code, m.device)


class Runner:
    """Runs jobs (see the module doc). ``use_ray``: through a Ray actor pool, else in this process."""

    def __init__(self, use_ray: bool, on_change: Callable[[Job], None] | None = None,
                 on_unit: Callable[[int], None] | None = None):
        self.use_ray = use_ray
        self.jobs: list[Job] = []
        self.groups: list[dict] = []  # one entry per model pass: model, jobs, seconds, model loads
        self.session: dict | None = None  # the backend session's info (address, resources)
        self._on_change = on_change or (lambda job: None)
        self._on_unit = on_unit or (lambda done: None)
        self.progress: Progress | None = None
        self.units_arrived = 0  # units persisted by this invocation
        self._written = False  # the running manifests are written (from then on every way out is recorded)

    def open(self, name: str, config: RunConfig, started: str, extra: dict | None = None) -> Job:
        """Validate ``config`` and open its run directory (writes nothing but corrupt-partial moves)."""
        prepared = prepare(config, model_identity=not self.use_ray)  # a Ray driver reads no weight file
        rdir = open_run_dir(prepared)
        manifest = {**base_manifest(prepared, "running", started), **(extra or {})}
        job = Job(name, config, prepared, rdir, manifest, len(rdir.todo()))
        self.jobs.append(job)
        return job

    @property
    def todo_samples(self) -> int:
        return int(sum(sum(len(u) for u in j.rdir.todo()) for j in self.jobs))

    def run(self, progress_every_s: float = 5.0) -> list[Job]:
        """Compute and finalize every job; returns them (``status`` says how each ended).

        Every way out is recorded: a job not finished when an error escapes is marked ``failed``
        (with the reason) in its manifest, and ``interrupted`` on Ctrl-C or SIGTERM
        (``signals.Terminated``); the error is re-raised (storage errors as ``RunError``, Ray's
        wrappers already unwrapped to their cause by the backend) and every lease is released.
        """
        total = sum(j.prepared.n_selected for j in self.jobs)
        todo = self.todo_samples
        self.progress = Progress(total, total - todo, progress_every_s)
        groups: dict[tuple, list[Job]] = {}
        for job in self.jobs:
            groups.setdefault(job.model_key, []).append(job)
        need = self.use_ray and any(j.left for j in self.jobs)
        cluster = self.jobs[0].config.cluster if self.jobs else None
        self._written = False
        try:
            with signals.sigterm_interrupts():
                with backends.session(cluster, use_ray=need) as session:
                    signals.install()  # again: ray.init replaced the SIGTERM handler
                    try:
                        prepare_model_side(self.jobs, session)  # identities and pilots, where the weights are
                        self._run_in(session, groups)
                    except BaseException as exc:
                        # marked while the backend is still up: nothing that happens when Ray shuts
                        # down can leave a manifest "running" (issue 17)
                        out = self._record(exc)
                        if out is exc:
                            raise
                        raise out from exc
        except BaseException as exc:
            out = self._record(exc)
            if out is exc:
                raise
            raise out from exc
        finally:
            self.close()
        return self.jobs

    def _run_in(self, session: dict | None, groups: dict[tuple, list[Job]]) -> None:
        self.session = session
        if session is not None:
            for job in self.jobs:
                check_device(job.config.model.device, session["resources"].get("GPU", 0))
            for job in self.jobs:  # compaction and the final merge fold one state merged by a tree of Ray tasks
                merger = backends.tree_merger()  # (issue 31), not one state per shipment, on the driver
                job.rdir.set_merger(merger, min_partials=merger.fan_in)
        for job in self.jobs:  # like a standalone run: "running" until the job is finalized
            results.write_manifest(job.prepared.run_dir, job.manifest)
        self._written = True
        for group in groups.values():
            self._pass(group)

    def _record(self, exc: BaseException) -> BaseException:
        """Mark every unfinished job's manifest for ``exc`` (once) and return what to raise: an
        ``OSError`` becomes a ``RunError`` naming it; the others are returned as they are."""
        if getattr(exc, "_raysens_recorded", False):
            return exc
        if isinstance(exc, OSError):
            exc = RunError(f"storage error: {type(exc).__name__}: {exc}")
        if self._written:
            if isinstance(exc, (KeyboardInterrupt, faults.SimulatedInterrupt)):
                self._mark_unfinished("interrupted", _interrupt_reason(exc))
            elif isinstance(exc, Exception):
                own = type(exc).__module__.startswith("raysens.")  # raysens' errors say what failed already
                self._mark_unfinished("failed", str(exc) if own else f"{type(exc).__name__}: {exc}")
            else:  # SystemExit, GeneratorExit: not ours to describe
                return exc
            _set_hint(exc, self.resume_hint())
        try:
            exc._raysens_recorded = True
        except AttributeError:
            pass
        return exc

    def resume_hint(self) -> str:
        """``5/9 units are saved in DIR; rerun the same command to resume``."""
        done = sum(len(j.rdir.done) for j in self.jobs)
        total = sum(len(j.prepared.units) for j in self.jobs)
        where = self.jobs[0].prepared.run_dir if len(self.jobs) == 1 else f"{len(self.jobs)} run directories"
        return f"{done}/{total} units are saved in {where}; rerun the same command to resume"

    def close(self) -> None:
        """Release every job's run-directory lease (idempotent)."""
        for job in self.jobs:
            job.rdir.close()

    def _mark_unfinished(self, status: str, reason: str) -> None:
        """Write ``status`` and ``error`` into the manifest of every job that did not finish."""
        for job in self.jobs:
            if job.status in ("complete", "failed"):
                continue
            job.status, job.error = status, reason
            m = {**job.manifest, "status": status, "error": reason,
                 "units": {**job.manifest["units"], "done": len(job.rdir.done)}}
            try:
                results.write_manifest(job.prepared.run_dir, m)
            except Exception as exc:  # the original error matters more than this one
                log(f"{job.name}: could not mark the manifest {status} ({type(exc).__name__}: {exc})")
            self._on_change(job)

    # ------------------------------------------------------------------ one model's pass
    def _pass(self, group: list[Job]) -> None:
        tg = time.perf_counter()
        backend: dict = {}
        for job in group:
            job.started, job.status = tg, "running"
            self._on_change(job)
        for job in group:
            if not job.left:  # every partial already there (e.g. killed while finalizing)
                self._finish(job, {"backend": "none (all partials present)"}, len(group))
        work = [j for j in group if j.left]
        if work:
            if len(work) > 1:
                log(f"model {work[0].config.model.name}: one pass for {len(work)} runs: "
                    f"{', '.join(j.name for j in work)}")
            if self.use_ray:
                backend.update(backend="ray", address=self.session["address"],
                               cluster_resources=self.session["resources"])

            def on_result(ji: int, units: list, n: int, payload: bytes) -> None:
                job = work[ji]
                new = job.rdir.add(units, payload)
                if not new:
                    return  # a retried or overlapping shipment: its units are (or will be) computed once
                job.load_ids.add(read_meta(payload).get("load_id"))  # meta only: the driver never decodes arrays here
                job.left -= len(new)
                job.rdir.compact(job.config.output.compact_every)  # rolling compaction (store/compaction.py)
                self.progress.update(n)
                self._on_unit(self.progress.done)
                self.units_arrived += len(new)
                faults.unit_arrived(self.units_arrived)
                if job.left == 0:
                    self._finish(job, {**backend, "pass_s": round(time.perf_counter() - tg, 3)}, len(group))

            # the pass, then at most one follow-up pass over what no actor shipped (an actor that got no
            # end-of-stream flush, or died holding folded units: backends/ray_pool.py), shipping every unit
            for attempt in range(2 if self.use_ray else 1):
                if attempt:
                    job_left = [j for j in work if j.status == "running" and j.left]
                    if not job_left:
                        break
                    for j in job_left:
                        j.rdir.flush()
                    log(f"follow-up pass: {sum(len(j.rdir.todo()) for j in job_left)} unit(s) were folded by an actor "
                        "but never shipped (no end-of-stream flush reached it, or it died); recomputing them")
                    work = job_left
                specs = [backends.JobUnits(j.config, j.prepared.corpus, dispatch_order(j.prepared, j.rdir.todo()),
                                           j.prepared.fingerprint,
                                           ship_every_units=1 if attempt else None) for j in work]
                backends.run_jobs(specs, on_result, use_ray=self.use_ray, info=backend)
        loads = set().union(*(j.load_ids for j in group))
        self.groups.append({"model": group[0].config.model.name, "runs": [j.name for j in group],
                            "pass_s": round(time.perf_counter() - tg, 3), "model_loads": len(loads),
                            "load_ids": sorted(x for x in loads if x),
                            "num_actors": group[0].config.cluster.num_actors if self.use_ray else 1})
        for job in group:
            if job.status == "running":  # some unit produced no result
                job.rdir.flush()  # writes in flight count as done
                missing = job.rdir.todo()
                job.status = "incomplete"
                job.error = (f"{len(missing)} units produced no result (first sample_ids "
                             f"{[int(u[0]) for u in missing[:5]]}); rerun with the same output.dir to compute them")
                results.write_manifest(job.prepared.run_dir, {**job.manifest, "status": "incomplete", "error": job.error})
                self._on_change(job)

    def _finish(self, job: Job, backend: dict, pass_size: int) -> None:
        rdir = job.rdir
        dt = time.perf_counter() - job.started
        timings = {"wall_s": round(dt, 3), "compute_wall_s": round(dt, 3), "samples_this_run": rdir.samples_written,
                   "samples_per_s": round(rdir.samples_written / dt, 4) if rdir.samples_written and dt > 0 else None}
        if pass_size > 1:
            timings["note"] = ("the run shares its model's pass with the model's other runs: wall time from that "
                               "pass's start to this run's last unit")
        try:
            job.final = finalize(job.prepared, rdir, job.manifest, timings,
                                 {**backend, "model_load_ids": sorted(x for x in job.load_ids if x)})
            job.status = "complete"
        except RunError as exc:
            job.status, job.error = "failed", str(exc)
            log(f"{job.name} failed: {exc}")
            if results.read_manifest(job.prepared.run_dir).get("status") != "failed":
                results.write_manifest(job.prepared.run_dir, {**job.manifest, "status": "failed", "error": str(exc)})
        self._on_change(job)


# ---------------------------------------------------------------------- a plain run
@dataclass
class RunSummary:
    run_dir: str  # where the results are (path or URI)
    manifest: dict  # what was written to <run_dir>/manifest.json

    def load(self) -> RunResult:
        """Statistics per layer as numpy arrays (``raysens.store.results.load_run``)."""
        return load_run(self.run_dir)

    @property
    def plots(self) -> list[str]:
        return self.manifest.get("plots", [])


def run(config: RunConfig, paired: "dict | PairedConfig | None" = None) -> RunSummary:
    """Run ``config`` (Ray or in-process according to ``config.cluster.use_ray``)::

        from raysens.config import load_config
        from raysens.run.runner import run
        summary = run(load_config("jobs/configs/quickstart.yaml", ["--data.limit=50"]))
        summary.load()[15].mean        # [S, S] numpy array

    ``paired`` (issue 29): a paired run of ``config``'s model against side b (a ``PairedConfig`` or its
    mapping, replacing ``config.paired``), e.g. ``run(cfg, paired={"random_init": True})``;
    ``summary.load()`` is side a, ``raysens.store.paired_results.read_diff_stats(summary.run_dir, L)``
    the per-cell differences with their paired standard errors and FDR-controlled tests.

    Ray: an embedded local Ray when no address is given (neither ``cluster.address`` nor
    ``$RAY_ADDRESS``), else the cluster at that address. Rerunning with the same config and
    ``output.dir`` recomputes only the units whose partials are missing or corrupt.
    """
    return _run(with_paired(config, paired), use_ray=config.cluster.use_ray)


def run_local(config: RunConfig, paired: "dict | PairedConfig | None" = None) -> RunSummary:
    """The same units through the core in this process, no Ray (the reference for equivalence)."""
    return _run(with_paired(config, paired), use_ray=False)


def with_paired(config: RunConfig, paired: "dict | PairedConfig | None") -> RunConfig:
    """``config`` with its ``paired`` section replaced (None: unchanged); a mapping is validated like the
    config file's ``paired:`` section (``ConfigError`` naming the key)."""
    if paired is None:
        return config
    if isinstance(paired, dict):
        d = config.to_dict()
        d["paired"] = paired
        return RunConfig.from_dict(d)
    return dataclasses.replace(config, paired=paired)


def _run(config: RunConfig, use_ray: bool) -> RunSummary:
    job = _run_one(config, use_ray)
    _print_summary(job.prepared, job.final)
    return RunSummary(job.prepared.run_dir, job.final)


def with_overrides(config: RunConfig, **sections) -> RunConfig:
    """``with_overrides(cfg, data={"limit": 10})``: a copy with some fields of some sections replaced."""
    out = {}
    for name, changes in sections.items():
        if name == "paired":  # an optional section: built from its mapping
            config = with_paired(config, changes)
            continue
        cur = getattr(config, name)
        out[name] = dataclasses.replace(cur, **changes) if dataclasses.is_dataclass(cur) else changes
    return dataclasses.replace(config, **out)


def _print_summary(prepared: PreparedRun, m: dict) -> None:
    s = m["samples"]
    log(f"done: {s['computed']} samples computed, {s['skipped']} skipped "
        f"{s.get('skipped_by_reason') or ''} in {m['timings']['wall_s']:.1f}s")
    print(f"results: {prepared.run_dir}")
    heat = [p for p in m.get("plots", []) if "heatmap" in p]
    if len(prepared.layers) <= 3:
        for L in prepared.layers:
            print(f"  layer {L}: {prepared.run_dir}/stats/layer_{L:03d}.npz")
        for p in heat:
            print(f"  heatmap: {prepared.run_dir}/{p}")
    else:  # many layers: one line each kind, not one per layer
        print(f"  stats: {prepared.run_dir}/stats/layer_NNN.npz for {len(prepared.layers)} layers "
              f"({prepared.layers[0]}..{prepared.layers[-1]})")
        if "plots/layers_summary.png" in m.get("plots", []):
            print(f"  layer profile: {prepared.run_dir}/plots/layers_summary.png")
        if heat:
            print(f"  heatmap: {prepared.run_dir}/{heat[-1]} (and one per layer: plots/layer_NNN_heatmap.png)")
    if m.get("paired"):
        a, b = m["paired"]["labels"]
        print(f"  paired: side a = {a}, side b = {b}; side b in stats/b/, differences (paired SE, "
              f"FDR {m['paired']['fdr']:g}) in stats/diff/")
    print(f"load with: raysens.load_run({prepared.run_dir!r})" + (
        "  (side a; differences: raysens.store.paired_results.read_diff_stats(run_dir, layer))"
        if m.get("paired") else ""))


def _run_one(config: RunConfig, use_ray: bool) -> Job:
    """A plain run: one job through the runner. Raises ``RunError`` unless it completes."""
    t0 = time.perf_counter()
    started = now_iso()
    runner = Runner(use_ray)
    job = runner.open(config.output.dir or "run", config, started)  # validates: raises before anything is written
    prepared = job.prepared
    log(f"run {prepared.fingerprint}: {prepared.n_selected} samples of {prepared.n_rows} in {len(prepared.units)} units, "
        f"layers {list(prepared.layers)}, {config.sensitivity.estimator.value}, precision "
        f"{config.sensitivity.precision.value}; {runner.todo_samples} samples to "
        f"compute -> {prepared.run_dir}")
    runner.run(config.output.progress_every_s)
    if job.status != "complete":
        err = RunError(job.error or f"run ended {job.status}")
        if job.status == "incomplete":
            _set_hint(err, runner.resume_hint())
        raise err
    m = job.final
    m["timings"]["wall_s"] = round(time.perf_counter() - t0, 3)  # including validation, final merge and plots
    if runner.session:
        m["backend"]["address"] = runner.session["address"]
    results.write_manifest(prepared.run_dir, m)
    return job
