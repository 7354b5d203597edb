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
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
from raysens.config import load_config
from raysens.run.monitor import MemoryMonitor
from raysens.run.runner import run
out, model = sys.argv[1], sys.argv[2]
cfg = load_config(None, [f"--model.name={model}", f"--output.dir={out}", "--data.limit=8", "--data.max_seq_len=16",
                         "--layers=[1,2]", "--cluster.batch_size=4", "--sensitivity.budget=3",
                         "--sensitivity.num_probes=2", "--sensitivity.pilot_samples=4", "--cluster.use_ray=true",
                         "--cluster.num_actors=1", "--output.plots=false", "--output.progress_every_s=0"])
with MemoryMonitor(0.05) as mem:
    summary = run(cfg)
hwm = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
plan = summary.manifest.get("plan") or {}
print("RESULT " + json.dumps({"rss_peak_mb": mem.summary()["rss_peak_mb"], "vm_hwm_mb": hwm,
                              "status": summary.manifest["status"], "layer_plan": plan.get("layer_plan"),
                              "pilot_ran_in": (plan.get("pilot") or {}).get("ran_in", "driver")}), flush=True)
"""


def measure(tree: Path, model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="raysens-driver-rss-") as d:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("RAY_ADDRESS", None)
        p = subprocess.run([sys.executable, "-c", CHILD, str(Path(d) / "run"), model], cwd=d, env=env,
                           capture_output=True, text=True)
    res = [json.loads(x[len("RESULT "):]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not res:
        raise RuntimeError(f"{tree}: driver failed (rc {p.returncode}): {p.stderr[-3000:]}")
    return res[0]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--baseline-tree", default=None, help="a checkout of the code before (its driver runs the pilot)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    here = Path(__file__).resolve().parents[2]
    conv = subprocess.run([sys.executable, "-c", "import sys; from raysens.core.models import load_model; "
                           "lm = load_model(sys.argv[1]); print(sum(p.numel() for p in lm.model.parameters()))",
                           a.model], env={**os.environ, "PYTHONPATH": str(here)}, capture_output=True, text=True)
    if conv.returncode:
        raise RuntimeError(conv.stderr[-2000:])
    params = int(conv.stdout.split()[-1])
    fp32_mb = params * 4 / 2**20
    res = {"model": a.model, "parameters": params, "fp32_mb": round(fp32_mb, 1), "trees": {}}
    for name, tree in (("this", here), ("baseline", a.baseline_tree)):
        if tree is None:
            continue
        r = measure(Path(tree), a.model)
        peak = max(r["rss_peak_mb"], r["vm_hwm_mb"])
        r.update(tree=str(tree), peak_mb=round(peak, 1), peak_over_fp32=round(peak / fp32_mb, 3))
        res["trees"][name] = r
        print(f"{name}: driver peak {peak:.0f} MB = {peak / fp32_mb:.2f} x fp32 weights "
              f"(pilot in {r['pilot_ran_in']})", file=sys.stderr)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
