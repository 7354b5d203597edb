"""The Ray pipeline measured alone: throughput with many actors of a synthetic model.

A synthetic model (``raysens.core.models.synthetic``: ``synthetic:L<blocks>-lat<seconds>``) sleeps a fixed
latency per work unit — a GPU's time per unit that costs no CPU here — and returns maps of the real
shapes, so the partials have realistic sizes. With N actors the ideal steady rate is N / latency
units per second; parallel efficiency = measured steady rate / ideal. The steady rate is taken from
the units' own timelines (start and end times in each partial's meta) over the window in which
every actor is busy, so actor start-up and the tail do not count; the lag from a unit's end to its
arrival on disk shows whether the driver keeps up.

    python -m jobs.bench.actors scaling --actors 1 4 16 32 --latency 1.0 --layers 2 --seq 16 \
        --json jobs/results/actors_small.json          # the pipeline's own limit (tiny partials)
    python -m jobs.bench.actors scaling --actors 1 4 8 --latency 1.0 --layers 28 --seq 64 \
        --json jobs/results/actors_28x64.json           # realistic partials (28 layers, S=64)
    python -m jobs.bench.actors driver --layers 28 --seq 64 --units 24   # driver alone: partials/s, MB/s

Each scaling point runs in a fresh subprocess with its own embedded local Ray (``cluster.num_cpus``
= N + 6 logical CPUs, actors reserving 0.1 CPU each).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.harness import log, run_command, synthetic_corpus, write_json

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
BATCH = 8


def _overrides(model: str, corpus: Path, samples: int, seq: int, layers: int, actors: int, out: Path) -> list[str]:
    return [f"--model.name={model}", f"--data.source={corpus}", "--data.kind=text", f"--data.limit={samples}",
            f"--data.max_seq_len={seq}", f"--layers={list(range(1, layers + 1))}", f"--cluster.num_actors={actors}",
            f"--cluster.batch_size={BATCH}", "--cluster.cpus_per_actor=0.1", f"--cluster.num_cpus={actors + 6}",
            "--cluster.tokenize_cpus=0.1", "--output.plots=false", "--output.progress_every_s=30",
            f"--output.dir={out}"]


def _timeline(run_dir: Path) -> dict:
    """Steady-state figures from the partials' own timelines (``started``/``finished`` in each meta,
    by actor pid) and their arrival at the driver (file modification time).

    Steady window: from the moment the last actor started its first unit to the moment the first
    actor finished its last unit — every actor is busy in between, so start-up and the tail do not
    count. ``completed`` = units finished inside the window; ideal = actors × window / latency.
    """
    from raysens.store.partials import read_meta

    rows = []
    for f in (run_dir / "partials").glob("unit_*.npz"):
        m = read_meta(f.read_bytes())
        rows.append((m["pid"], m["started"], m["finished"], f.stat().st_mtime))
    by_actor: dict = {}
    for pid, t0, t1, _ in rows:
        by_actor.setdefault(pid, []).append((t0, t1))
    w0 = max(min(t0 for t0, _ in v) for v in by_actor.values())
    w1 = min(max(t1 for _, t1 in v) for v in by_actor.values())
    done = sum(1 for _, _, t1, _ in rows if w0 < t1 <= w1)
    lag = [arr - t1 for _, _, t1, arr in rows]
    return {"actors_seen": len(by_actor), "window_s": max(w1 - w0, 0.0), "completed_in_window": done,
            "driver_lag_s_median": float(np.median(lag)), "driver_lag_s_max": float(np.max(lag)), "units": len(rows)}


def scaling(args) -> dict:
    rows = []
    for n in args.actors:
        tmp = Path(tempfile.mkdtemp(prefix="rs-actors-"))
        units = n * args.units_per_actor
        synthetic_corpus(tmp / "corpus.txt", units * BATCH, args.seq)
        model = f"synthetic:L{args.layers}-lat{args.latency}"
        cmd = [sys.executable, "jobs/run.py", QUICKSTART,
               *_overrides(model, tmp / "corpus.txt", units * BATCH, args.seq, args.layers, n, tmp / "run")]
        t0 = time.perf_counter()
        run_command(cmd, env={"RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
        wall = time.perf_counter() - t0
        m = json.loads((tmp / "run" / "manifest.json").read_text())
        tl = _timeline(tmp / "run")
        ideal = n / args.latency
        rate = tl["completed_in_window"] / tl["window_s"] if tl["window_s"] > 0 else float("nan")
        size = np.mean([q.stat().st_size for q in (tmp / "run" / "partials").glob("unit_*.npz")])
        row = {"actors": n, "wall_s": round(wall, 1), "steady_units_per_s": round(rate, 3),
               "ideal_units_per_s": round(ideal, 3), "efficiency": round(rate / ideal, 3),
               "partials_per_s": round(rate, 2), "partial_mb": round(size / 1e6, 3),
               "driver_mb_per_s": round(rate * size / 1e6, 2), "samples": m["samples"]["computed"],
               **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in tl.items()}}
        rows.append(row)
        log(f"actors {n:3d}: {rate:7.2f} units/s of ideal {ideal:7.2f} -> efficiency {rate / ideal:5.1%} "
            f"(window {tl['window_s']:.1f} s); {row['partial_mb']:.2f} MB/partial, {row['driver_mb_per_s']:.1f} MB/s "
            f"into the driver, arrival lag median {tl['driver_lag_s_median']:.2f} s; wall {wall:.0f} s")
    return {"latency_s": args.latency, "layers": args.layers, "seq": args.seq, "batch_size": BATCH, "rows": rows}


def driver(args) -> dict:
    """What the driver alone sustains per partial: read its meta (load id), persist it (RunDir.add)."""
    from raysens.backends.units import UnitWorker, WorkerSpec, tokenize_unit
    from raysens.core.models import load_tokenizer_and_config
    from raysens.store.partials import decode_partial, read_meta
    from raysens.store.rundir import RunDir, RunIdentity

    model = f"synthetic:L{args.layers}"
    tok, _ = load_tokenizer_and_config(model)
    w = UnitWorker(WorkerSpec(model, False, "cpu", {}, list(range(1, args.layers + 1)), args.seq, "bench"))
    text = "lorem ipsum dolor " * (args.seq // 4 + 2)
    units = [np.arange(u * BATCH, (u + 1) * BATCH) for u in range(args.units)]
    payloads = [w.process(tokenize_unit(u, [text] * BATCH, tok, args.seq, 2)) for u in units]
    mb = np.mean([len(p) for p in payloads]) / 1e6
    out = {"layers": args.layers, "seq": args.seq, "units": args.units, "partial_mb": round(mb, 3)}
    for name, fn in (("decode_full_s", decode_partial), ("read_meta_s", read_meta)):
        t0 = time.perf_counter()
        for p in payloads:
            fn(p)
        out[name] = round((time.perf_counter() - t0) / len(payloads), 5)
    for writers in (0, 4):  # synchronous writes vs the background pool the runner uses
        rdir = RunDir(tempfile.mkdtemp(prefix="rs-driver-"), units,
                      RunIdentity("bench", tuple(range(1, args.layers + 1)), args.seq), writers=writers)
        rdir.open()
        t0 = time.perf_counter()
        for u, p in zip(units, payloads):
            read_meta(p)
            rdir.add(int(u[0]), p)
        t_loop = time.perf_counter() - t0
        rdir.flush()  # every partial on storage
        per = (time.perf_counter() - t0) / len(payloads)
        rdir.close()
        out[f"writers_{writers}"] = {"driver_loop_s_per_partial": round(t_loop / len(payloads), 5),
                                     "persisted_s_per_partial": round(per, 5), "partials_per_s": round(1 / per, 1),
                                     "mb_per_s": round(mb / per, 1)}
        log(f"driver, {writers} writer threads: {1 / per:.1f} partials/s = {mb / per:.0f} MB/s persisted "
            f"({mb:.2f} MB each); the driver's own loop {t_loop / len(payloads) * 1e3:.1f} ms per partial")
    log(f"full decode {out['decode_full_s']*1e3:.0f} ms vs meta only {out['read_meta_s']*1e3:.1f} ms per partial")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.actors", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("scaling", help="throughput with N synthetic actors (one subprocess and Ray per N)")
    s.add_argument("--actors", type=int, nargs="+", default=[1, 4, 16, 32])
    s.add_argument("--latency", type=float, default=1.0, help="seconds per unit of the synthetic model")
    s.add_argument("--units-per-actor", type=int, default=6)
    d = sub.add_parser("driver", help="the driver alone: persisting partials")
    d.add_argument("--units", type=int, default=24)
    for p in (s, d):
        p.add_argument("--layers", type=int, default=28)
        p.add_argument("--seq", type=int, default=64)
        p.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    res = scaling(args) if args.mode == "scaling" else driver(args)
    write_json(res, args.json, echo=True)


if __name__ == "__main__":
    main()
