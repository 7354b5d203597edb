"""Statistics at scale (issue 18): the pipeline's own bookkeeping with the synthetic engine.

The synthetic engine (``raysens.core.models.synthetic``) computes nothing: what is measured is the per-cell
state (update, encode, ship, decode, merge), the run directory and the driver. Every run is a fresh
child process (``jobs.harness.run_child`` of ``child``; with ``--baseline-tree``, under that
checkout's raysens), so its peak RSS (``ru_maxrss`` of the
child; with Ray: of the driver process) belongs to that run alone; the run directory's size is
polled every 0.2 s (its peak) and taken at the end.

    python -m jobs.bench.scale rate [--small 64] [--large 2048] [--layers 28] [--seq 64] [--reps 1]
    python -m jobs.bench.scale long [--seq 512] [--layers 28] [--samples 32]
    python -m jobs.bench.scale driver [--layers 28] [--seq 64] [--unit 32] [--rounds 1]  # driver CPU per state
    python -m jobs.bench.scale state [--samples 512]     # bytes/cell, quantile errors vs np.quantile, update CPU
    python -m jobs.bench.scale all --json jobs/results/scale.json      # the issue's target table
    ... --baseline-tree /tmp/main-checkout    # also run another checkout (same sizes, alternately)

``rate``: the marginal bookkeeping rate, (large − small) samples / (wall(large) − wall(small)), so
start-up (imports, Ray, actors) cancels, in-process and on Ray with one actor (zero latency).
``driver``: the driver's CPU per received state (write, read, decode, merge) and the GPU actors one
driver can serve (a GPU actor's unit time / that CPU), shipping every unit or every 64 units.
``long``: one in-process run at a long sequence length: wall, peak RSS, run-directory bytes.
Runs alternate in-process / Ray. The machine (2 cores) is shared with other engineers: timings vary.

Why this module is long: one benchmark end to end: its corpus, the child process per run with its
RSS and directory-size sampling, the four measured scenarios and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from jobs.harness import alternate, dir_bytes, log, maxrss_mib, run_child, synthetic_corpus, write_json

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _child(spec: dict) -> dict:
    """One run in this (fresh) process: wall, peak RSS, peak and final run-directory bytes."""
    from raysens.config import load_config
    from raysens.run.runner import run, run_local

    tmp = Path(spec["tmp"])
    synthetic_corpus(tmp / "corpus.txt", spec["samples"], spec["seq"])
    out = tmp / "run"
    ov = [f"--model.name=synthetic:L{spec['layers']}", f"--data.source={tmp / 'corpus.txt'}", "--data.kind=text",
          f"--data.limit={spec['samples']}", f"--data.max_seq_len={spec['seq']}",
          f"--layers={list(range(1, spec['layers'] + 1))}", f"--cluster.batch_size={spec['batch']}",
          "--output.plots=false", "--output.progress_every_s=600", f"--output.dir={out}", *spec.get("extra", [])]
    if spec["kind"] == "ray":
        ov += ["--cluster.use_ray=true", "--cluster.num_actors=1", "--cluster.num_cpus=4"]
    cfg = load_config(None, ov)
    peak = [0]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], dir_bytes(out))
            time.sleep(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0, c0 = time.perf_counter(), time.process_time()
    (run if spec["kind"] == "ray" else run_local)(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    th.join()
    final = dir_bytes(out)
    return {**{k: spec[k] for k in ("kind", "samples", "layers", "seq", "batch")}, "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),  # this process's CPU (in-process: all the bookkeeping; Ray: the driver's)
            "peak_rss_mib": round(maxrss_mib(), 1),
            "rundir_peak_bytes": max(peak[0], final), "rundir_final_bytes": final}


def _spawn(spec: dict, tree: str | None = None) -> dict:
    """Run ``spec`` in a child process with this tree's raysens, or ``tree``'s (another checkout: the baseline)."""
    with tempfile.TemporaryDirectory(prefix="rs-scale-") as tmp:
        res = run_child("jobs.bench.scale:child", {**spec, "tmp": tmp}, tree=tree, timeout=7200)
    res["tree"] = "baseline" if tree else "new"
    log(f"[scale] {json.dumps(res)}", err=True)
    return res


def child(spec: dict) -> dict:
    """Child-process body: the driver's cost per state (``kind`` driver) or one run."""
    return _driver_child(spec) if spec["kind"] == "driver" else _child(spec)


def _driver_child(spec: dict) -> dict:
    """The driver's CPU per received state in this process's raysens: a shipment of ``layers`` CellStats
    at ``seq`` (each built from ``unit`` lognormal samples), written to a file, read back, decoded and
    merged into the running fold (what compaction does with it). Process CPU time, median of ``reps``."""
    import numpy as np

    from raysens.stats.cells import CellStats
    from raysens.store.partials import decode_partial, encode_partial

    rng = np.random.default_rng(0)
    L, S, B = spec["layers"], spec["seq"], spec["unit"]
    ids = list(range(B))
    mask = np.broadcast_to(np.tril(np.ones((S, S), bool)), (B, S, S))
    states = {l: CellStats.from_batch(rng.lognormal(0, 2, (B, S, S)) * mask, mask, None, ids) for l in range(1, L + 1)}
    meta = {"fingerprint": "0" * 16, "unit": 0, "sample_ids": ids, "units": [0], "unit_ids": [ids],
            "computed_ids": ids, "skipped": {}, "layers": list(states), "compute_s": 0.0, "device": "cpu",
            "strategy": "synthetic"}
    payload = encode_partial(meta, states)
    acc = {l: st.copy() for l, st in states.items()}
    path = Path(spec["tmp"]) / "p.npz"
    times = []
    for _ in range(spec["reps"]):
        t0 = time.process_time()
        path.write_bytes(payload)
        p = decode_partial(path.read_bytes())
        for l, st in p.states.items():
            acc[l].merge(st)
        times.append(time.process_time() - t0)
    cpu = float(np.median(times))
    gpu_unit_s = B * spec["gpu_sample_s"]  # one GPU actor's unit of B samples at GPU speed
    return {"layers": L, "seq": S, "unit": B, "payload_bytes": len(payload), "driver_cpu_ms_per_state": round(1e3 * cpu, 2),
            "gpu_s_per_unit": gpu_unit_s,
            "actors_served_one_state_per_unit": int(gpu_unit_s / cpu),
            "actors_served_ship_every_64_units": int(64 * gpu_unit_s / cpu)}


def state(args) -> dict:
    """The compact state itself (in this process): bytes per cell, quantile errors against
    ``np.quantile`` (lognormal cells, merged from batches) next to the stated bound, update CPU time."""
    import numpy as np

    from raysens.stats.cells import CellStats

    rng = np.random.default_rng(0)
    S, B, N = 32, 32, args.samples
    out: dict = {"samples": N, "quantiles": []}
    for sigma in (0.5, 1.0, 2.0):
        x = rng.lognormal(0, sigma, (N, S, S))
        st = CellStats.from_batch(x[:B], None, None, np.arange(B))
        for i in range(B, N, B):
            st.merge(CellStats.from_batch(x[i:i + B], None, None, np.arange(i, i + B)))
        q = st.statistics()
        for name, v in (("q25", .25), ("median", .5), ("q75", .75)):
            ref = np.quantile(x, v, axis=0)
            err = np.abs(q[name] - ref) / ref
            out["quantiles"].append({"sigma": sigma, "stat": name, "max_rel_err": round(float(err.max()), 4),
                                     "median_rel_err": round(float(np.median(err)), 4),
                                     "stated_bound": round(float(np.nanmax(q["quantile_bound"])), 4)})
        out["bytes_per_cell"] = sum(a.nbytes for a in st.to_arrays().values()) / S / S
    x = rng.lognormal(0, 2, (8, 64, 64))
    CellStats.from_batch(x)
    t = time.process_time()
    for _ in range(20):
        CellStats.from_batch(x)
    out["from_batch_cpu_ms_8x64x64"] = round(1e3 * (time.process_time() - t) / 20, 2)
    # folding a batch into a warm state (40 batches in): merge(from_batch) vs the in-place update,
    # alternating, causal gamma maps like the synthetic engine's (same bits either way)
    causal = np.tril(np.ones((64, 64)))
    xs = [rng.gamma(1.0, 3.0, (8, 64, 64)) * causal for _ in range(80)]
    warm = CellStats.from_batch(xs[0])
    for i in range(1, 40):
        warm.merge(CellStats.from_batch(xs[i], None, None, np.arange(8) + 8 * i))
    a, b, ta, tb = warm.copy(), warm.copy(), 0.0, 0.0
    for i in range(40, 80):
        ids = np.arange(8) + 8 * i
        t = time.process_time()
        a.merge(CellStats.from_batch(xs[i], None, None, ids))
        ta += time.process_time() - t
        if hasattr(CellStats, "check"):  # the in-place update exists (issue 18, second round)
            t = time.process_time()
            b.update(xs[i], None, None, ids)
            tb += time.process_time() - t
    out["merge_from_batch_cpu_ms_8x64x64"] = round(1e3 * ta / 40, 3)
    out["update_cpu_ms_8x64x64"] = round(1e3 * tb / 40, 3) if tb else None
    log(f"[scale] {json.dumps(out)}", err=True)
    return out


def driver(args) -> list[dict]:
    """One child per tree and round, the trees alternating (new, baseline, new, ...: ``--rounds``)."""
    out = []
    for rnd, tree in alternate([None] + ([args.baseline_tree] if args.baseline_tree else []), args.rounds):
        out.append({**_spawn({"kind": "driver", "layers": args.layers, "seq": args.seq, "unit": args.unit,
                              "reps": args.reps, "gpu_sample_s": args.gpu_sample_s}, tree), "round": rnd})
    return out


def rate(args) -> dict:
    """Alternates new / baseline (``--baseline-tree``) and in-process / Ray, small / large runs."""
    runs = []
    trees = [None] + ([args.baseline_tree] if args.baseline_tree else [])
    for _ in range(args.reps):
        for n in (args.small, args.large):
            for kind in args.kinds:
                for tree in trees:
                    runs.append(_spawn({"kind": kind, "samples": n, "layers": args.layers, "seq": args.seq,
                                        "batch": args.batch, "extra": args.extra if not tree else []}, tree))
    out = {"layers": args.layers, "seq": args.seq, "batch": args.batch, "small": args.small, "large": args.large,
           "runs": runs}
    for tree in ("new", "baseline") if args.baseline_tree else ("new",):
        for kind in args.kinds:
            w = {n: min(r["wall_s"] for r in runs if r["kind"] == kind and r["samples"] == n and r["tree"] == tree)
                 for n in (args.small, args.large)}
            dt = w[args.large] - w[args.small]
            pre = "" if tree == "new" else "baseline_"
            out[f"{pre}{kind}_marginal_samples_per_s"] = round((args.large - args.small) / dt, 1) if dt > 0 else None
            out[f"{pre}{kind}_marginal_ms_per_sample"] = round(1e3 * dt / (args.large - args.small), 2)
            sel = [r for r in runs if r["kind"] == kind and r["tree"] == tree]
            if all("cpu_s" in r for r in sel):  # the machine is shared: CPU time is what load does not inflate
                c = {n: min(r["cpu_s"] for r in sel if r["samples"] == n) for n in (args.small, args.large)}
                out[f"{pre}{kind}_marginal_cpu_ms_per_sample"] = round(1e3 * (c[args.large] - c[args.small])
                                                                       / (args.large - args.small), 2)
    return out


def long(args) -> list[dict]:
    out = []
    for tree in [None] + ([args.baseline_tree] if args.baseline_tree else []):
        out.append(_spawn({"kind": "local", "samples": args.samples, "layers": args.layers, "seq": args.seq,
                           "batch": args.batch, "extra": args.extra if not tree else []}, tree))
    return out


def table(res: dict) -> str:
    lines = ["| target | measured |", "|---|---|"]
    r = res.get("rate")
    if r:
        for pre in ("", "baseline_"):
            for kind, name in (("local", "in-process"), ("ray", "Ray, 1 actor")):
                if f"{pre}{kind}_marginal_samples_per_s" in r:
                    lines.append(f"| {pre.rstrip('_') or 'new'}: {r['layers']} layers, S={r['seq']}, {name}: marginal "
                                 f"rate {r['small']} vs {r['large']} samples | "
                                 f"{r[f'{pre}{kind}_marginal_samples_per_s']} samples/s "
                                 f"({r[f'{pre}{kind}_marginal_ms_per_sample']} ms/sample) |")
    for x in res.get("long", []):
        lines.append(f"| {x.get('tree', 'new')}: S={x['seq']}, {x['layers']} layers, {x['samples']} samples, in-process | "
                     f"{x['wall_s']} s, {x['peak_rss_mib'] / 1024:.2f} GiB peak RSS, run dir "
                     f"{x['rundir_peak_bytes'] / 1e6:.1f} MB peak / {x['rundir_final_bytes'] / 1e6:.1f} MB final |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.scale", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r, lg, a = sub.add_parser("rate"), sub.add_parser("long"), sub.add_parser("all")
    for p in (r, a):
        p.add_argument("--small", type=int, default=64)
        p.add_argument("--large", type=int, default=2048)
        p.add_argument("--reps", type=int, default=1)
        p.add_argument("--kinds", nargs="+", default=["local", "ray"])
    for p in (r, lg, a):
        p.add_argument("--layers", type=int, default=28)
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--extra", nargs="*", default=[], help="more config overrides, e.g. --output.compact_every=0")
        p.add_argument("--json", help="also write the results here")
        p.add_argument("--baseline-tree", help="another checkout (e.g. of main) to run alternately as the baseline")
    r.add_argument("--seq", type=int, default=64)
    lg.add_argument("--seq", type=int, default=512)
    lg.add_argument("--samples", type=int, default=32)
    a.add_argument("--seq", type=int, default=64)
    a.add_argument("--long", nargs="+", default=["512x28x32", "2048x2x8"], help="SEQxLAYERSxSAMPLES runs")
    d = sub.add_parser("driver")
    d.add_argument("--layers", type=int, default=28)
    d.add_argument("--seq", type=int, default=64)
    d.add_argument("--unit", type=int, default=32, help="samples per unit")
    d.add_argument("--reps", type=int, default=15)
    d.add_argument("--rounds", type=int, default=1, help="child processes per tree, the trees alternating")
    d.add_argument("--gpu-sample-s", type=float, default=0.03, help="GPU seconds per all-layer sample (benchmark notes)")
    d.add_argument("--json")
    d.add_argument("--baseline-tree")
    st = sub.add_parser("state")
    st.add_argument("--samples", type=int, default=512)
    st.add_argument("--json")
    st.add_argument("--baseline-tree")
    args = ap.parse_args(argv)
    res: dict = {"cpus": len(os.sched_getaffinity(0)), "load_avg_1m_start": os.getloadavg()[0]}
    if args.cmd in ("rate", "all"):
        res["rate"] = rate(args)
    if args.cmd == "long":
        res["long"] = long(args)
    if args.cmd == "driver":
        res["driver"] = driver(args)
        if args.baseline_tree:  # the best child of each tree (the machine is shared: the least disturbed)
            best = {t: min(r["driver_cpu_ms_per_state"] for r in res["driver"] if r["tree"] == t)
                    for t in ("new", "baseline")}
            res["driver_cpu_ratio_new_over_baseline"] = round(best["new"] / best["baseline"], 3)
    if args.cmd == "state":
        res["state"] = state(args)
    if args.cmd == "all":
        res["long"] = []
        for item in args.long:
            s, L, n = (int(v) for v in item.split("x"))
            res["long"].append(_spawn({"kind": "local", "samples": n, "layers": L, "seq": s, "batch": args.batch,
                                       "extra": args.extra}))
            if args.baseline_tree and s * s * L * 1624 < 8e9:  # the baseline's state fits in memory
                res["long"].append(_spawn({"kind": "local", "samples": n, "layers": L, "seq": s, "batch": args.batch},
                                          args.baseline_tree))
    res["load_avg_1m_end"] = os.getloadavg()[0]
    res["table"] = table(res) if args.cmd not in ("driver", "state") else json.dumps(res[args.cmd])
    log(res["table"], err=True)
    write_json(res, args.json, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
