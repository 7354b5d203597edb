"""How many GPU actors one driver serves at S = 512, 28 layers (issue 31): the driver's cost per
received state, measured here, against the shipment cadence of ``cluster.ship_every_units: auto``
(``raysens.backends.spec.JobUnits.ship_every`` sized to the driver's cost, ``ShipPolicy`` sized to the
unit time) and the old one (``ship_every_s`` 60 s with the old ``ShipPolicy``: a shipment every 2 GPU
units at S = 512).

    python -m jobs.bench.driver_s512 [--seq 512] [--layers 28] [--unit 32] [--reps 3] [--gpu-sample-s 3.7]
                                     [--json jobs/results/driver_s512.json]

Per state (one child process, this checkout's raysens): what the driver does with a shipment — write
the payload to a file, read it back, ``decode_partial``, ``CellStats.merge`` into the running fold
(rolling compaction) — CPU and wall seconds, median of ``reps``; the actor's ``encode_partial`` for
reference. One 28-layer state is built from one layer's ``CellStats`` (``unit`` lognormal causal
samples) copied per layer: the costs are per cell, the same for every layer.

Served actors: an actor ships every ``interval`` seconds (the cadence, a whole number of units of
``unit × gpu_sample_s`` seconds, as ``ShipPolicy`` decides on a simulated clock); the driver is busy
``actors × cost / interval`` of the time (cost: the driver's CPU seconds per state). Reported: the
largest pool with the driver busy < 50 % under each cadence, and per pool size the interval (what a
killed actor can lose) and the busy fraction; at the end of a run every actor ships its last state
at once, ``actors × cost`` of merging after the last unit (no tree of merges yet). ``--gpu-sample-s`` 3.7: Qwen2-1.5B TF32 on the H200 at S = 64
(0.058 s/sample, docs/benchmarks.md) scaled by S² to S = 512 (an assumption: no GPU ran S = 512).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from jobs.harness import log, maxrss_mib, write_json


def measure(seq: int, layers: int, unit: int, reps: int) -> dict:
    import numpy as np

    from raysens.stats.cells import CellStats
    from raysens.store.partials import decode_partial, encode_partial

    rng = np.random.default_rng(0)
    ids = list(range(unit))
    mask = np.broadcast_to(np.tril(np.ones((seq, seq), bool)), (unit, seq, seq))
    one = CellStats.from_batch(rng.lognormal(0, 2, (unit, seq, seq)) * mask, mask, None, ids)
    states = {L: one.copy() for L in range(1, layers + 1)}
    meta = {"fingerprint": "0" * 16, "units": [0], "unit_ids": [ids], "computed_ids": ids, "skipped": {},
            "layers": list(states), "compute_s": 0.0, "device": "cpu", "strategy": "synthetic"}
    t0, c0 = time.perf_counter(), time.process_time()
    payload = encode_partial(meta, states)
    enc = (time.perf_counter() - t0, time.process_time() - c0)
    raw = sum(a.nbytes for a in one.to_arrays().values()) * layers
    acc = {L: st.copy() for L, st in states.items()}
    del states
    cpu, wall = [], []
    with tempfile.TemporaryDirectory(prefix="rs-driver-") as tmp:
        path = Path(tmp) / "p.npz"
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            path.write_bytes(payload)
            p = decode_partial(path.read_bytes())
            for L, st in p.states.items():
                acc[L].merge(st)
            del p
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"seq": seq, "layers": layers, "unit": unit, "state_raw_bytes": raw, "payload_bytes": len(payload),
            "actor_encode_wall_s": round(enc[0], 2), "driver_cpu_s_per_state": round(float(np.median(cpu)), 3),
            "driver_wall_s_per_state": round(float(np.median(wall)), 3),
            "peak_rss_mib": round(maxrss_mib(), 1)}


class OldShipPolicy:
    """``ShipPolicy`` before issue 31 (main at 7758f54), for the baseline column."""

    def __init__(self, every_units: int, every_s: float, min_s: float = 0.0):
        self.every_units, self.every_s, self.min_s = max(1, int(every_units)), float(every_s), float(min_s)

    def due(self, worker) -> bool:
        from raysens.backends import units as mod

        n = len(worker.pending_units)
        waited = mod.time.perf_counter() - worker.pending_since
        return bool(n) and ((n >= self.every_units and waited >= self.min_s) or waited >= self.every_s)


def ship_interval(every: tuple, unit_s: float, shipments: int = 4, old: bool = False) -> float:
    """Mean seconds between one actor's shipments under ``ShipPolicy(*every)`` (``old``: the policy before
    issue 31) with units of ``unit_s`` (a simulated clock; the first shipment is left out)."""
    from raysens.backends import units as mod

    clock = [0.0]
    policy = (OldShipPolicy if old else mod.ShipPolicy)(*every)
    w, sizes = SimpleNamespace(pending_units=[], pending_since=0.0), []
    with mock.patch.object(mod.time, "perf_counter", lambda: clock[0]):
        k = 0
        while len(sizes) < shipments:
            k += 1
            clock[0] += unit_s
            if not w.pending_units:
                w.pending_since = clock[0]
            w.pending_units.append(k)
            if policy.due(w):
                sizes.append(len(w.pending_units))
                w.pending_units = []
    sizes = sizes[1:] or sizes
    return unit_s * sum(sizes) / len(sizes)


def cadence(actors: int, seq: int, layers: int, auto: bool) -> tuple:
    from raysens.backends.spec import JobUnits
    from raysens.config import load_config

    ov = [f"--data.max_seq_len={seq}", f"--layers={list(range(1, layers + 1))}", "--cluster.gpus_per_actor=1",
          f"--cluster.num_actors={actors}"]
    every = JobUnits(load_config(None, ov), None, [], "f").ship_every
    return every if auto else (every[0], 60.0, 10.0)  # the old auto: 60 s, at least 10 s


def table(cost_s: float, unit_s: float, seq: int, layers: int, pools=(8, 16, 32, 64, 128, 256)) -> list[dict]:
    """Per pool size: each cadence's seconds between an actor's shipments and the driver's busy fraction."""
    rows = []
    for a in pools:
        row = {"actors": a}
        for name, auto in (("new", True), ("old", False)):
            iv = ship_interval(cadence(a, seq, layers, auto), unit_s, old=not auto)
            row[f"{name}_interval_s"], row[f"{name}_busy"] = round(iv, 1), round(a * cost_s / iv, 3)
        rows.append(row)
    return rows


def served(cost_s: float, unit_s: float, seq: int, layers: int, auto: bool, busy: float = 0.5) -> int:
    """The largest pool (at most 4096) whose driver is busy < ``busy`` (the new cadence grows with the pool,
    so its busy fraction is about constant: any pool, or none)."""
    best = 0
    for a in range(1, 4097) if not auto else (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        if a * cost_s / ship_interval(cadence(a, seq, layers, auto), unit_s, old=not auto) < busy:
            best = a
        elif not auto:
            break
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.driver_s512", description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--unit", type=int, default=32, help="samples per unit (the GPU auto batch size)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu-sample-s", type=float, default=3.7, help="GPU seconds per all-layer sample at --seq")
    ap.add_argument("--json")
    ap.add_argument("--measured", help="a JSON written by an earlier --json: its per-state cost, not measured again")
    a = ap.parse_args(argv)
    m = json.loads(Path(a.measured).read_text()) if a.measured else measure(a.seq, a.layers, a.unit, a.reps)
    log(f"[driver_s512] {json.dumps(m)}", err=True)
    unit_s = a.unit * a.gpu_sample_s
    cost = m["driver_cpu_s_per_state"]  # the driver's own work (wall is inflated by a shared machine's load)
    out = {**m, "gpu_unit_s": round(unit_s, 1), "cost_s_per_state_used": cost,
           "actors_served_busy_lt_50pct": {"new": served(cost, unit_s, a.seq, a.layers, True),
                                          "old": served(cost, unit_s, a.seq, a.layers, False)},
           "by_pool": table(cost, unit_s, a.seq, a.layers),
           "end_of_run_merge_s_at_64": round(64 * cost, 1)}
    write_json(out, a.json, echo=True)
    return out


if __name__ == "__main__":
    main()
