"""The driver's peak RSS in a planned Ray run of SmolLM2 (issue 31): the driver never loads the model.

    python -m jobs.bench.driver_rss                                 # this tree
    git archive main | tar -x -C /tmp/raysens-main                  # the code before, for the baseline
    python -m jobs.bench.driver_rss --baseline-tree /tmp/raysens-main

A small planned run (``sensitivity.budget``: the pilot and the plan; 8 samples, S = 16, layers 1
and 2, one CPU actor, an embedded local Ray started by the driver) runs in a fresh child process per
tree, with ``raysens.run.monitor.MemoryMonitor`` sampling the driver's RSS every 50 ms; the child
also reports ``VmHWM`` (its peak RSS, Ray's own processes and the actors excluded). Prints JSON with
each tree's peak and its ratio to the model's float32 size (``parameters × 4``; SmolLM2-135M:
~538 MB). The target is a peak below that size. The float32 conversion of the GGUF file is made
once beforehand (both trees read the same cache), so neither run pays the ~40 s dequantisation.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from jobs.harness import add_baseline_arg, add_json_arg, log, run_child, trees, write_json


def child(spec: dict) -> dict:
    """Child-process body: the planned Ray run whose driver is measured (``spec``: out, model)."""
    from raysens.config import load_config
    from raysens.run.monitor import MemoryMonitor
    from raysens.run.runner import run

    cfg = load_config(None, [f"--model.name={spec['model']}", f"--output.dir={spec['out']}", "--data.limit=8",
                             "--data.max_seq_len=16", "--layers=[1,2]", "--cluster.batch_size=4",
                             "--sensitivity.budget=3", "--sensitivity.num_probes=2", "--sensitivity.pilot_samples=4",
                             "--cluster.use_ray=true", "--cluster.num_actors=1", "--output.plots=false",
                             "--output.progress_every_s=0"])
    with MemoryMonitor(0.05) as mem:
        summary = run(cfg)
    hwm = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    plan = summary.manifest.get("plan") or {}
    return {"rss_peak_mb": mem.summary()["rss_peak_mb"], "vm_hwm_mb": hwm, "status": summary.manifest["status"],
            "layer_plan": plan.get("layer_plan"), "pilot_ran_in": (plan.get("pilot") or {}).get("ran_in", "driver")}


def parameters(spec: dict) -> dict:
    """Child-process body: the model's parameter count (its float32 conversion cached for both trees)."""
    from raysens.core.models import load_model

    lm = load_model(spec["model"])
    return {"parameters": sum(p.numel() for p in lm.model.parameters())}


def measure(tree: Path, model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="raysens-driver-rss-") as d:
        return run_child("jobs.bench.driver_rss:child", {"out": str(Path(d) / "run"), "model": model}, tree=tree,
                         cwd=d, env={"PYTHONDONTWRITEBYTECODE": "1"}, unset=("RAY_ADDRESS",))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.driver_rss", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    add_baseline_arg(ap)
    add_json_arg(ap)
    a = ap.parse_args(argv)
    params = run_child("jobs.bench.driver_rss:parameters", {"model": a.model})["parameters"]
    fp32_mb = params * 4 / 2**20
    res = {"model": a.model, "parameters": params, "fp32_mb": round(fp32_mb, 1), "trees": {}}
    for name, tree in trees(a.baseline_tree).items():
        r = measure(tree, a.model)
        peak = max(r["rss_peak_mb"], r["vm_hwm_mb"])
        r.update(tree=str(tree), peak_mb=round(peak, 1), peak_over_fp32=round(peak / fp32_mb, 3))
        res["trees"][name] = r
        log(f"{name}: driver peak {peak:.0f} MB = {peak / fp32_mb:.2f} x fp32 weights "
            f"(pilot in {r['pilot_ran_in']})", err=True)
    write_json(res, a.json, echo=True)
    return res


if __name__ == "__main__":
    main()
