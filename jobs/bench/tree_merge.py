"""Driver cost of one compaction of k shipped states, with and without the tree of merges (issue 31).

    python -m jobs.bench.tree_merge [--seq 256] [--layers 28] [--states 16] [--unit 32] [--cpus 2]
                                    [--json jobs/results/tree_merge_S256.json]
    python -m jobs.bench.tree_merge --parts [--seq 256] [--layers 28] [--json ...]

Side by side in one command, each mode in a fresh child process (this checkout's raysens): the
same ``states`` partial payloads (``unit`` lognormal causal samples with probe noise at width
``seq``, one layer's ``CellStats`` copied per layer as in ``driver_s512.py``: the costs are per cell)
are added to an empty ``RunDir`` (written, as the driver does when shipments arrive), then ONE
``RunDir.compact`` folds them all into a checkpoint:

- ``driver``: no merger (the driver decodes and merges every state; Ray is not started);
- ``tree``: an embedded local Ray with ``--cpus`` CPUs and the runner's merger
  (``backends.tree_merger``: ``merge_partials`` tasks of ``spec.TREE_FAN_IN``, level by level); the
  driver reads the files, puts them into the object store and decodes the one merged state.

Reported per mode: the driver process's CPU seconds (``process_time``: every thread of the driver,
Ray's included) and wall seconds of the compaction, the driver's peak RSS, the checkpoint's name
(it carries the SHA-256 of the bytes: equal names = the same checkpoint bit for bit), the load average.
The tree mode's worker CPU is the merge tasks' own ``process_time``, summed (measured in the tasks).

``--parts``: the driver's CPU seconds per piece for one such state, to extrapolate to other counts:
reading the file, ``ray.put`` (the tree's per-state cost on the driver), ``decode_partial``,
``Fold.add`` into an empty fold and ``Fold.encode`` of the checkpoint (per compaction, both modes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from jobs.harness import log, maxrss_mib, run_child, write_json

FP = "b" * 16


def _say(msg: str) -> None:
    log(f"[tree_merge] {msg}", err=True)


def make_payloads(out: Path, seq: int, layers: int, states: int, unit: int) -> dict:
    """``states`` partial files of one unit each (unit keys 0, unit, 2·unit, ...) in ``out``."""
    import numpy as np

    from raysens.stats.cells import CellStats
    from raysens.store.partials import encode_partial

    rng = np.random.default_rng(0)
    ids = list(range(unit))
    mask = np.broadcast_to(np.tril(np.ones((seq, seq), bool)), (unit, seq, seq))
    vals = rng.lognormal(0, 2, (unit, seq, seq)) * mask
    base = CellStats.from_batch(vals, mask, rng.random((unit, seq, seq)) * mask, ids).to_arrays()
    del vals
    sizes = []
    for j in range(states):
        shift = j * unit
        a = {k: v.copy() for k, v in base.items()}
        for k in ("max_id", "row_max_id"):  # the same maps, sample_ids of unit j
            a[k] = np.where(a[k] >= 0, a[k] + shift, -1)
        st = CellStats.from_arrays(a)
        jids = [i + shift for i in ids]
        meta = {"fingerprint": FP, "units": [shift], "unit_ids": [jids], "computed_ids": jids, "skipped": {},
                "layers": list(range(1, layers + 1)), "compute_s": 1.0 + j / 7, "device": "cpu",
                "strategy": "synthetic", "mode": "reverse", "load_id": f"bench:{j}"}
        payload = encode_partial(meta, {L: st for L in range(1, layers + 1)})
        (out / f"{j:04d}.npz").write_bytes(payload)
        sizes.append(len(payload))
        _say(f"payload {j + 1}/{states}: {len(payload) / 2**20:.1f} MiB")
    return {"payload_mib": round(sum(sizes) / len(sizes) / 2**20, 1)}


def child(spec: dict) -> dict:
    """One mode in a fresh process (``run_child("jobs.bench.tree_merge:child", spec)``)."""
    return compact(**spec)


def compact(mode: str, src: str, run_dir: str, seq: int, layers: int, states: int, unit: int, cpus: int) -> dict:
    import numpy as np

    from raysens.store.rundir import RunDir, RunIdentity

    units = [np.arange(j * unit, (j + 1) * unit) for j in range(states)]
    rd = RunDir(run_dir, units, RunIdentity(FP, tuple(range(1, layers + 1)), seq))
    task_cpu = None
    if mode == "tree":
        import ray

        from raysens import backends
        from raysens.backends import merges

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        real = merges._merge_task

        def timed(checks, names, drop, *payloads):  # the task's own CPU seconds, returned beside its payload
            import time as t

            c0 = t.process_time()
            out = real(checks, names, drop, *payloads)
            return out, t.process_time() - c0

        cpu_log = []

        class Remote:  # unwraps (payload, cpu) in a second tiny task so the tree still passes plain payloads
            def remote(self, *a):
                pair = timed_remote.remote(*a)
                cpu_log.append(second.remote(pair))
                return first.remote(pair)

        timed_remote = ray.remote(num_cpus=1, num_returns=1)(timed)
        first = ray.remote(num_cpus=0)(lambda p: p[0])
        second = ray.remote(num_cpus=0)(lambda p: p[1])
        merges._merge_remote = Remote()
        merger = backends.tree_merger()
        rd.set_merger(merger, min_partials=merger.fan_in)
    rd.open()
    for j, f in enumerate(sorted(os.listdir(src))):
        rd.add([j * unit], Path(src, f).read_bytes())
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    folded = rd.compact(states)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if mode == "tree":
        import ray

        task_cpu = round(sum(ray.get(cpu_log)), 2)
        tasks = len(cpu_log)
    ckpt = rd.ckpt_name
    rd.close()
    assert folded == states, folded
    return {"mode": mode, "driver_cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "checkpoint": ckpt,
            "driver_peak_rss_mib": round(maxrss_mib(), 1),
            "merge_tasks": tasks if mode == "tree" else 0, "worker_cpu_s": task_cpu,
            "loadavg_1m_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)]}


def parts(seq: int, layers: int, unit: int) -> dict:
    import numpy as np

    from raysens.stats.cells import CellStats
    from raysens.store.checkpoint import Fold
    from raysens.store.partials import decode_partial, encode_partial

    rng = np.random.default_rng(0)
    ids = list(range(unit))
    mask = np.broadcast_to(np.tril(np.ones((seq, seq), bool)), (unit, seq, seq))
    st = CellStats.from_batch(rng.lognormal(0, 2, (unit, seq, seq)) * mask, mask, rng.random((unit, seq, seq)) * mask, ids)
    meta = {"fingerprint": FP, "units": [0], "unit_ids": [ids], "computed_ids": ids, "skipped": {},
            "layers": list(range(1, layers + 1)), "compute_s": 1.0, "device": "cpu"}
    payload = encode_partial(meta, {L: st for L in range(1, layers + 1)})
    del st

    def cpu(f, n=3):
        ts = []
        for _ in range(n):
            c = time.process_time()
            f()
            ts.append(time.process_time() - c)
        return round(float(np.median(ts)), 3)

    out = {"seq": seq, "layers": layers, "unit": unit, "payload_mib": round(len(payload) / 2**20, 1)}
    with tempfile.TemporaryDirectory(prefix="rs-tree-") as tmp:
        path = Path(tmp, "p.npz")
        path.write_bytes(payload)
        out["read_s"] = cpu(path.read_bytes)
    fold = Fold(range(1, layers + 1))
    c = time.process_time()
    p = decode_partial(payload)
    out["decode_s"] = round(time.process_time() - c, 3)
    c = time.process_time()
    fold.add(p, "unused")
    out["fold_add_s"] = round(time.process_time() - c, 3)
    del p
    out["checkpoint_encode_s"] = cpu(lambda: fold.encode(FP), 2)
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    refs = []
    out["put_s"] = cpu(lambda: refs.append(ray.put(payload)), 4)
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.tree_merge", description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--states", type=int, default=16)
    ap.add_argument("--unit", type=int, default=32)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--parts", action="store_true", help="the driver's CPU seconds per piece for one state")
    a = ap.parse_args(argv)
    shape = dict(seq=a.seq, layers=a.layers, states=a.states, unit=a.unit)
    if a.parts:
        out = parts(a.seq, a.layers, a.unit)
        write_json(out, a.json, echo=True)
        return out
    tmp = Path(tempfile.mkdtemp(prefix="rs-tree-"))
    try:
        (tmp / "payloads").mkdir()
        out = {**shape, "cpus": a.cpus, "cores": os.cpu_count(), **make_payloads(tmp / "payloads", **shape)}
        for mode in ("driver", "tree"):
            out[mode] = run_child("jobs.bench.tree_merge:child", {
                "mode": mode, "src": str(tmp / "payloads"), "run_dir": str(tmp / mode), "cpus": a.cpus, **shape})
            _say(json.dumps(out[mode]))
            shutil.rmtree(tmp / mode, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d, t = out["driver"], out["tree"]
    out["same_checkpoint_bytes"] = d["checkpoint"] == t["checkpoint"]
    out["driver_cpu_ratio_tree_over_driver"] = round(t["driver_cpu_s"] / d["driver_cpu_s"], 3)
    out["wall_ratio_tree_over_driver"] = round(t["wall_s"] / d["wall_s"], 3)
    write_json(out, a.json, echo=True)
    return out


if __name__ == "__main__":
    main()
