"""Peak host RSS of one worker folding one unit, with and without sub-units (issue 31,
``raysens.backends.subunits``), side by side, each in a fresh child process (``VmHWM``).

The synthetic engine (``synthetic:L28``, ``raysens.core.models.synthetic``) returns float64 maps of the real
shapes (``[batch, S, S]`` per target layer) at no model cost, so what is measured is the worker's own
memory: the engine's results of one call, their check and fold into the actor's state (214 B/cell per
layer), and the state. ``whole``: the unit in one engine call (no budget: today's CPU default);
``split``: ``sensitivity.memory_budget_mb`` set, the unit computed in sub-batches of the plan's size.
``--seq 2048`` with 28 layers cannot fit 4 GiB (the state alone is 214 B · 2048² · 28 = 23.4 GiB):
the child reports the one-line error, how long the worker took to raise it, and how many target
layers at that S fit the budget (``plan_unit``).

    python -m jobs.bench.subunits --seq 512 --layers 28 --unit 32 --budget-mb 4096
    python -m jobs.bench.subunits --seq 2048 --layers 28 --unit 32 --budget-mb 4096 --only split
"""

from __future__ import annotations

import argparse
import json
import time

from jobs.harness import log, proc_status_mib as _vm, run_child


def child(spec: dict) -> dict:
    """One case in a fresh process (``run_child("jobs.bench.subunits:child", spec)``)."""
    from raysens.backends.units import UnitWorker, WorkerSpec
    from raysens.store.rundir import RunError

    seq, layers, n = spec["seq"], spec["layers"], spec["unit"]
    sens = {} if spec["budget_mb"] is None else {"memory_budget_mb": spec["budget_mb"]}
    w = UnitWorker(WorkerSpec(f"synthetic:L{layers}", False, "cpu", sens, list(range(1, layers + 1)), seq, "bench"),
                   shared={}, planted={}, background=spec["background"])
    unit = {"unit": 0, "sample_ids": list(range(n)), "run_ids": list(range(n)), "input_ids": [[5] * seq] * n,
            "skipped_ids": [], "skipped_reasons": []}
    calls: list[int] = []
    real = w.engine.compute

    def compute(ids, *a, **kw):
        calls.append(len(ids))
        return real(ids, *a, **kw)

    w.engine.compute = compute
    base = _vm("VmRSS")
    t0 = time.perf_counter()
    out = {"seq": seq, "layers": layers, "unit": n, "budget_mb": spec["budget_mb"], "background": spec["background"],
           "rss_before_mb": round(base, 1)}
    try:
        w.fold(unit)
        got = w.collect(wait=True) or []
        out["fold_s"] = round(time.perf_counter() - t0, 2)
        out["peak_after_fold_mb"] = round(_vm("VmHWM"), 1)
        shipped = w.ship()
        out["payload_mb"] = round(len(shipped[2]) / 2**20, 1) if shipped else None
        out["peak_mb"] = round(_vm("VmHWM"), 1)
        out["calls"] = calls
        del got
    except RunError as exc:
        out.update(error=str(exc), error_after_s=round(time.perf_counter() - t0, 3), calls=calls,
                   peak_mb=round(_vm("VmHWM"), 1))
    if spec["budget_mb"] is not None:
        from jobs.bench.common import core_module

        sizing = core_module("memory.sizing", "sizing")
        ModelShape, plan_unit = sizing.ModelShape, sizing.plan_unit

        shape = ModelShape.from_model(w._model)
        plan = w.unit_plan(seq)
        fit = [L for L in range(1, layers + 1)  # with the worker's host budget (its own RSS taken off)
               if plan_unit(shape, sizing.Workload(seq=seq, target_layers=L, k=1, mode="reverse", manual=False),
                            budget=spec["budget_mb"] << 20, host_budget=plan.host_budget, max_unit=1 << 20).fits]
        out["most_layers_that_fit"] = max(fit) if fit else 0
        out["plan"] = {k: v for k, v in plan.__dict__.items() if k != "reason"}
    return out


def run(spec: dict) -> dict:
    return run_child("jobs.bench.subunits:child", spec)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.subunits", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--unit", type=int, default=32)
    ap.add_argument("--budget-mb", type=int, default=4096)
    ap.add_argument("--sequential", action="store_true", help="fold inline (RAYSENS_FOLD_THREAD=0's path)")
    ap.add_argument("--only", choices=["whole", "split"], default=None)
    a = ap.parse_args(argv)
    spec = {"seq": a.seq, "layers": a.layers, "unit": a.unit, "background": not a.sequential}
    res = {}
    for name, budget in (("whole", None), ("split", a.budget_mb)):
        if a.only in (None, name):
            res[name] = run({**spec, "budget_mb": budget})
            log(json.dumps({"case": name, **res[name]}))
    if len(res) == 2 and "peak_mb" in res["whole"] and "error" not in res["split"]:
        log(f"peak RSS split / whole: {res['split']['peak_mb'] / res['whole']['peak_mb']:.3f} "
              f"({res['split']['peak_mb']:.0f} / {res['whole']['peak_mb']:.0f} MiB)")


if __name__ == "__main__":
    main()
