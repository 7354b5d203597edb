"""Compute beside bookkeeping (issue 31): a worker's unit wall time with the fold and the shipment
encoding on background threads (``UnitWorker(background=True)``) against the sequential path
(``background=False``), side by side in one process.

The engine is a stand-in for a GPU: its compute sleeps (``time.sleep`` releases the GIL, as a CUDA
kernel wait does) and returns fresh realistic maps — ``layers`` target layers of causal gamma-distributed
values ``[unit, S, S]`` (float64, the copy to the host included in the compute time). The fold is the
real one (``CellStats.check``, the compiled kernel) and each shipment is a real ``encode_partial`` of
the whole state (zlib level 1).

    python -m jobs.bench.overlap [--seq 512] [--layers 28] [--unit 4] [--compute-s 2] [--units 24]
                                 [--ship-every 8] [--compute sleep|torch] [--fold-queues 1,2]
                                 [--json jobs/results/overlap.json]

``--fold-queues``: one background run per ``RAYSENS_FOLD_QUEUE`` depth (units whose results may wait for
the fold lane; 1 is the depth before issue 31's second overlap pass), side by side under ``by_fold_queue``;
the last one is the ``background`` the ratios describe (default: 2).

``--compute torch``: the compute is 4096² matmuls for ``compute-s`` seconds, on the GPU when there is
one (a device check: kernel launches and waits on the caller's thread beside the background fold).

Per path: ``wall`` (first unit to last shipment collected), ``steady`` (seconds per unit once the
first shipment is under way: the caller's cadence from the first shipment's unit to the last unit,
the steady state of a long-running actor whose background lag is bounded to one fold and one
shipment), the engine's total compute ``C``, the fold and encoding time ``fold_s`` / ``encode_s``
(wall, on whichever thread ran them; ``*_cpu_s``: that thread's CPU time, the same work on both
paths whatever the load), and the sequential path's bookkeeping ``K = wall_seq − C``
(fold, copy and encoding: what the GPU idles through today). Target: background per unit ≤ 1.15 ×
max(C, K) per unit; ``*_own_max`` use the background run's own fold + encode time for K (the same
load: on a shared machine the two runs see different loads). ``same_bits``: every array member of every
shipment has the same CRC-32 and size on both paths (the unit tests compare the arrays bit for bit).
``caller_wait*``: the caller's seconds in ``fold`` beyond the
engine's compute (backpressure: what is not hidden); ``*_faults``: minor page faults of the thread that
ran the fold / encoding (fresh pages). Peak RSS of each path: sampled every 0.1 s (``/proc/self/status``). The machine may be shared: the
two paths run one after the other, and the ratios are what to read.
"""

from __future__ import annotations

import argparse
import gc
import io
import time
import zipfile

import numpy as np

from jobs.harness import RssSampler, log, thread_minflt, write_json


def _say(msg: str) -> None:
    log(f"[overlap] {msg}", err=True)


class SleepEngine:
    """``compute`` copies a prebuilt unit's maps (fresh arrays, like a device-to-host copy) and
    sleeps out the rest of ``compute_s``: the caller's thread holds no GIL while it waits."""

    def __init__(self, layers, unit: int, seq: int, compute_s: float, kind: str = "sleep"):
        from raysens.core.engine import SensitivityBatch

        self.batch_cls, self.compute_s, self.total, self.kind = SensitivityBatch, float(compute_s), 0.0, kind
        if kind == "torch":  # matmuls on the GPU (CPU without one): the wait for them releases the GIL
            import torch

            self.torch, dev = torch, "cuda" if torch.cuda.is_available() else "cpu"
            self.a = torch.randn(4096, 4096, device=dev)
        rng = np.random.default_rng(0)
        causal = np.tril(np.ones((seq, seq)))
        self.maps = {L: rng.gamma(1.0, 1.0 + L, (unit, seq, seq)) * causal for L in layers}
        self.mask = np.ones((unit, seq, seq), bool)

    def resolve_layers(self, layers):
        return tuple(layers)

    def compute(self, ids, mask, *, layers, sample_ids, max_seq_len):
        t0 = time.perf_counter()
        values = {L: self.maps[L].copy() for L in layers}
        if self.kind == "torch":
            while time.perf_counter() - t0 < self.compute_s:
                (self.a @ self.a).sum().item()  # .item() waits for the device
        else:
            time.sleep(max(0.0, self.compute_s - (time.perf_counter() - t0)))
        self.total += time.perf_counter() - t0
        n = len(sample_ids)
        return self.batch_cls(layers=tuple(layers), values=values, noise=None, mask=self.mask.copy(),
                              lengths=np.full(n, self.mask.shape[1]), sample_ids=np.asarray(sample_ids),
                              estimator="bench", num_probes=1, strategy="bench")


def _members(payload: bytes) -> dict:
    """Array member name -> (CRC-32, size) of a partial (the meta member, with timings, left out)."""
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        return {i.filename: (i.CRC, i.file_size) for i in z.infolist() if i.filename != "meta.npy"}


def run_path(background: bool, a) -> dict:
    from raysens.backends.units import UnitWorker, WorkerSpec

    layers = list(range(1, a.layers + 1))
    w = UnitWorker(WorkerSpec(f"synthetic:L{a.layers}", False, "cpu", {}, layers, a.seq, "bench"), shared={},
                   planted={}, background=background)
    w.engine = SleepEngine(layers, a.unit, a.seq, a.compute_s, a.compute)
    spent = {"fold_s": 0.0, "encode_s": 0.0}  # the bookkeeping's own wall time, on whichever thread
    cpu = {"fold_cpu_s": 0.0, "encode_cpu_s": 0.0}  # and its CPU time (that thread's)
    faults = {"fold_faults": 0, "encode_faults": 0}  # minor page faults of that thread (fresh pages)
    for name, key in (("_fold_into", "fold"), ("_encode", "encode")):
        def timed(*args, _real=getattr(w, name), _key=key):
            t, c, f = time.perf_counter(), time.thread_time(), thread_minflt()
            try:
                return _real(*args)
            finally:
                spent[_key + "_s"] += time.perf_counter() - t
                cpu[_key + "_cpu_s"] += time.thread_time() - c
                faults[_key + "_faults"] += thread_minflt() - f
        setattr(w, name, timed)
    shipments, marks, waits = [], [], []
    first = a.ship_every - 1  # steady state: from the first shipment's unit on
    with RssSampler(every_s=0.1) as rss:  # this process's VmRSS
        t0 = time.perf_counter()
        for u in range(a.units):
            ids = list(range(u * a.unit, (u + 1) * a.unit))
            t, c0 = time.perf_counter(), w.engine.total
            w.fold({"unit": ids[0], "sample_ids": ids, "run_ids": ids, "input_ids": [[5] * a.seq] * a.unit,
                    "skipped_ids": [], "skipped_reasons": []})
            waits.append(time.perf_counter() - t - (w.engine.total - c0))  # the caller's time in fold beside compute
            if (u + 1) % a.ship_every == 0:
                if background:
                    w.ship_async()
                    shipments += w.collect()
                else:
                    shipments.append(w.ship())
            marks.append(time.perf_counter() - t0)  # the caller is done with unit u
            _say(f"{'background' if background else 'sequential'} unit {u}: {marks[-1]:.1f} s")
        shipments += w.collect(wait=True) if background else [s for s in [w.ship()] if s]
        wall = time.perf_counter() - t0
    steady = (marks[-1] - marks[first]) / max(1, a.units - 1 - first)
    out = {"wall_s": round(wall, 2), "per_unit_s": round(wall / a.units, 3), "steady_per_unit_s": round(steady, 3),
           "compute_s": round(w.engine.total, 2), **{k: round(v, 2) for k, v in spent.items()},
           "bookkeeping_per_unit_s": round(sum(spent.values()) / a.units, 3),
           **{k: round(v, 2) for k, v in cpu.items()}, **faults, "peak_rss_gb": round(rss.peak_mib / 2 ** 10, 2),
           "caller_wait_per_unit_s": round(sum(waits) / a.units, 3),
           "caller_wait_steady_per_unit_s": round(sum(waits[first + 1:]) / max(1, a.units - 1 - first), 3),
           "unit_marks_s": [round(m, 2) for m in marks],
           "shipments": [s[0] for s in shipments], "payload_mb": round(sum(len(s[2]) for s in shipments) / 1e6, 1)}
    out["members"] = [_members(s[2]) for s in shipments]
    del w, shipments
    gc.collect()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.overlap", description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512, help="S: positions per sample")
    ap.add_argument("--layers", type=int, default=28, help="target layers")
    ap.add_argument("--unit", type=int, default=4, help="samples per unit")
    ap.add_argument("--compute-s", type=float, default=2.0, help="the engine's seconds per unit (sleeping)")
    ap.add_argument("--compute", choices=("sleep", "torch"), default="sleep",
                    help="the engine's compute: sleep, or torch matmuls (on the GPU when there is one)")
    ap.add_argument("--units", type=int, default=24, help="units per path")
    ap.add_argument("--ship-every", type=int, default=8, help="units per shipment")
    ap.add_argument("--fold-queues", default="2",
                    help="background runs, one per RAYSENS_FOLD_QUEUE depth, comma-separated (e.g. 1,2: the "
                         "old depth beside the new, in this process); the last is reported as 'background'")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    import os

    from raysens.backends.overlap import QUEUE_ENV
    from raysens.stats.cells import warm_kernel

    warm_kernel()
    seq = run_path(False, a)
    members, runs = seq.pop("members"), {}
    for q in [int(v) for v in a.fold_queues.split(",")]:
        os.environ[QUEUE_ENV] = str(q)
        runs[q] = run_path(True, a)
        runs[q]["fold_queue"] = q
        runs[q]["same_bits"] = runs[q].pop("members") == members and runs[q]["shipments"] == seq["shipments"]
    os.environ.pop(QUEUE_ENV)
    bg = runs[q]
    same = all(r["same_bits"] for r in runs.values())
    c = seq["compute_s"] / a.units
    k = (seq["wall_s"] - seq["compute_s"]) / a.units  # the sequential path's bookkeeping per unit
    bound = max(c, k)
    own = max(c, bg["bookkeeping_per_unit_s"])  # the background run's own fold + encode time (same load)
    res = {"config": vars(a), "sequential": seq, "background": bg, "same_bits": same,
           "per_unit": {"compute_s": round(c, 3), "bookkeeping_s": round(k, 3), "max_s": round(bound, 3)},
           "ratios": {
               "background_steady_over_max": round(bg["steady_per_unit_s"] / bound, 3),
               "background_wall_over_max": round(bg["per_unit_s"] / bound, 3),
               "background_steady_over_own_max": round(bg["steady_per_unit_s"] / own, 3),
               "background_wall_over_own_max": round(bg["per_unit_s"] / own, 3),
               "sequential_wall_over_max": round(seq["per_unit_s"] / bound, 3),
               "speedup_wall": round(seq["wall_s"] / bg["wall_s"], 3),
           }, "target": "background_steady_over_max <= 1.15",
           "by_fold_queue": {q: {"steady_over_max": round(r["steady_per_unit_s"] / bound, 3),
                                 "wall_over_max": round(r["per_unit_s"] / bound, 3),
                                 "steady_over_own_max": round(r["steady_per_unit_s"] / max(c, r["bookkeeping_per_unit_s"]), 3),
                                 "caller_wait_steady_per_unit_s": r["caller_wait_steady_per_unit_s"],
                                 "fold_cpu_s": r["fold_cpu_s"], "encode_cpu_s": r["encode_cpu_s"],
                                 "peak_rss_gb": r["peak_rss_gb"], "same_bits": r["same_bits"]} for q, r in runs.items()}}
    write_json(res, a.json, echo=True)
    return res


if __name__ == "__main__":
    main()
