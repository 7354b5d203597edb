"""Run a sensitivity job end to end: corpus -> work units -> (Ray actor pool | this process) -> run directory.

    from raysens.config import load_config
    from raysens.pipeline import run
    summary = run(load_config("jobs/configs/quickstart.yaml", ["--data.limit=50"]))
    summary.load()[30].mean        # [S, S] numpy array

``run`` uses Ray (``cluster.use_ray``, the default): an embedded local Ray when no address is given
(neither ``cluster.address`` nor ``$RAY_ADDRESS``), else the cluster at that address. ``run_local``
runs exactly the same work units through the same core code in this process, without Ray.

Both write the same run directory (see ``raysens.distributed.driver``) and resume from it: rerunning
with the same config and ``output.dir`` recomputes only the units whose partials are missing or
corrupt.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from . import results
from .config import RunConfig
from .distributed.driver import Progress, RunDir, RunError, RunPlan, base_manifest, finalize, log, now_iso, prepare
from .results import RunResult, load_run

__all__ = ["run", "run_local", "RunSummary", "RunError", "load_run"]


@dataclass
class RunSummary:
    run_dir: str  # where the results are (path or URI)
    manifest: dict  # what was written to <run_dir>/manifest.json

    def load(self) -> RunResult:
        """Statistics per layer as numpy arrays (``raysens.results.load_run``)."""
        return load_run(self.run_dir)

    @property
    def plots(self) -> list[str]:
        return self.manifest.get("plots", [])


def run(config: RunConfig) -> RunSummary:
    """Run ``config`` (Ray or in-process according to ``config.cluster.use_ray``)."""
    return _run(config, use_ray=config.cluster.use_ray)


def run_local(config: RunConfig) -> RunSummary:
    """The same units through the core in this process, no Ray (the reference for equivalence)."""
    return _run(config, use_ray=False)


def _run(config: RunConfig, use_ray: bool) -> RunSummary:
    t0 = time.perf_counter()
    started = now_iso()
    plan = prepare(config)  # validates corpus, model, layers: raises before anything is written
    rdir = RunDir(plan)
    rdir.open()  # refuses a directory of another config; sets corrupt partials aside
    todo = rdir.todo()
    session = _connect(config) if (use_ray and todo) else None  # an unreachable cluster fails here
    try:
        manifest = base_manifest(plan, "running", started)
        results.write_manifest(plan.run_dir, manifest)
        n_todo = int(sum(len(u) for u in todo))
        log(f"run {plan.fingerprint}: {plan.n_selected} samples of {plan.n_rows} in {len(plan.units)} units, "
            f"layers {list(plan.layers)}, {config.sensitivity.estimator.value}; {n_todo} samples to compute "
            f"-> {plan.run_dir}")
        progress = Progress(plan.n_selected, plan.n_selected - n_todo, config.output.progress_every_s)

        def on_result(unit: int, n: int, payload: bytes) -> None:
            if rdir.add(unit, payload):
                progress.update(n)

        t1 = time.perf_counter()
        backend: dict = {"backend": "ray" if use_ray else "local"}
        if todo and use_ray:
            from .distributed.raypipe import run_units

            backend = {**run_units(config, plan.corpus, todo, plan.fingerprint, on_result),
                       "address": session["address"], "cluster_resources": session["resources"]}
        elif todo:
            backend = _compute_local(plan, todo, on_result)
        t2 = time.perf_counter()
    finally:
        if session and session["started_here"]:
            import ray

            ray.shutdown()
    missing = rdir.todo()
    if missing:
        raise RunError(f"{len(missing)} units produced no result (first sample_ids "
                       f"{[int(u[0]) for u in missing[:5]]}); rerun with the same output.dir to compute them")
    timings = {"wall_s": round(time.perf_counter() - t0, 3), "compute_wall_s": round(t2 - t1, 3),
               "samples_this_run": rdir.samples_written,
               "samples_per_s": round(rdir.samples_written / (t2 - t1), 4) if rdir.samples_written else None}
    m = finalize(plan, rdir, manifest, timings, backend)
    m["timings"]["wall_s"] = round(time.perf_counter() - t0, 3)  # including the final merge and plots
    results.write_manifest(plan.run_dir, m)
    _report(plan, m)
    return RunSummary(plan.run_dir, m)


def _connect(config: RunConfig) -> dict:
    from .distributed.raypipe import connect

    info = connect(config.cluster)
    info["resources"] = {k: v for k, v in info["resources"].items() if k in ("CPU", "GPU", "memory")}
    return info


def _compute_local(plan: RunPlan, todo, on_result) -> dict:
    from .distributed.work import UnitWorker, get_tokenizer, tokenize_unit

    cfg = plan.config
    worker = UnitWorker(cfg.model.name, cfg.model.trust_remote_code, cfg.model.device, cfg.sensitivity.to_dict(),
                        list(cfg.layers), cfg.data.max_seq_len, plan.fingerprint)
    tok = get_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    for ids in todo:
        unit = tokenize_unit(ids, plan.corpus.texts(ids), tok, cfg.data.max_seq_len, cfg.data.min_tokens,
                             cfg.data.add_special_tokens)
        on_result(unit["unit"], len(ids), worker.process(unit))
    return {"backend": "local", "device": worker.device}


def _report(plan: RunPlan, m: dict) -> None:
    s = m["samples"]
    log(f"done: {s['computed']} samples computed, {s['skipped']} skipped "
        f"{s.get('skipped_by_reason') or ''} in {m['timings']['wall_s']:.1f}s")
    print(f"results: {plan.run_dir}")
    for L in plan.layers:
        print(f"  layer {L}: {plan.run_dir}/stats/layer_{L:03d}.npz")
    for p in m.get("plots", []):
        if "heatmap" in p:
            print(f"  heatmap: {plan.run_dir}/{p}")
    print(f"load with: raysens.load_run({plan.run_dir!r})")


def with_overrides(config: RunConfig, **sections) -> RunConfig:
    """``with_overrides(cfg, data={"limit": 10})``: a copy with some fields of some sections replaced."""
    out = {}
    for name, changes in sections.items():
        cur = getattr(config, name)
        out[name] = dataclasses.replace(cur, **changes) if dataclasses.is_dataclass(cur) else changes
    return dataclasses.replace(config, **out)
