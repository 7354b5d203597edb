"""Run-directory bytes: rolling compaction and the compact partial format (issue 10).

Two measurements, recorded in ``docs/pipeline-benchmarks.md`` and ``jobs/results/rundir_bytes.json``::

    # bytes of a run directory after 1k, 10k, 100k samples, with and without compaction: a synthetic
    # model (raysens.core.models.synthetic, no latency) with all its layers, in process (no Ray)
    python -m jobs.bench.rundir growth --samples 1000 10000 100000 --layers 4 --seq 16 --compact-every 0 64
    # bytes per unit of the partial format (the one written today) and of a checkpoint, 28 layers S=64
    python -m jobs.bench.rundir payload --layers 28 --seq 64 --batch 8
    python -m jobs.bench.rundir all --json jobs/results/rundir_bytes.json     # both, the defaults above

``growth`` runs each (samples, compact_every) point in this process through ``raysens.run.runner``
and reports the directory's bytes at the end (every file under it) and the peak seen by a thread
that sums the sizes every 0.5 s while it runs, split into partials, checkpoint and the rest (with
compaction, finalize folds the last units too: a finished run keeps its checkpoint and no partial).
``payload`` encodes one unit's states (lognormal causal maps, every sample the full S: the worst
case for the histogram) in the partial format written today (``raysens.store.partials.FORMAT``; formats
1 and 2 of issue 10's table are refused since issue 18 and cannot be written any more), times encode
and decode, and folds 64 such units into a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from jobs.harness import log, synthetic_corpus, write_json


def _bytes(d: Path) -> dict:
    out = {"partials": 0, "checkpoint": 0, "other": 0, "files": 0}
    for root, _, files in os.walk(d):
        part = Path(root).relative_to(d).parts[:1]
        key = part[0] if part and part[0] in ("partials", "checkpoint") else "other"
        for f in files:
            try:
                out[key] += os.path.getsize(os.path.join(root, f))
                out["files"] += 1
            except OSError:  # deleted while we looked
                pass
    out["total"] = out["partials"] + out["checkpoint"] + out["other"]
    return out


def growth(samples: list[int], layers: int, seq: int, batch: int, every_list: list[int], workdir: Path) -> list[dict]:
    from raysens.config import load_config
    from raysens.run.runner import run_local

    corpus = workdir / "corpus.txt"
    synthetic_corpus(corpus, max(samples), seq)
    rows = []
    for n in samples:
        for every in every_list:
            out = workdir / f"run-{n}-{every}"
            cfg = load_config(None, [f"--model.name=synthetic:L{layers}", f"--data.source={corpus}", "--data.kind=text",
                                     f"--data.limit={n}", f"--data.max_seq_len={seq}",
                                     f"--layers={list(range(1, layers + 1))}", f"--cluster.batch_size={batch}",
                                     "--cluster.use_ray=false", f"--output.compact_every={every}",
                                     "--output.plots=false", "--output.progress_every_s=60", f"--output.dir={out}"])
            peak, stop = {"total": 0}, threading.Event()

            def poll():
                while not stop.wait(0.5):
                    b = _bytes(out) if out.exists() else {"total": 0}
                    if b["total"] > peak["total"]:
                        peak.update(b)

            t = threading.Thread(target=poll, daemon=True)
            t.start()
            t0 = time.perf_counter()
            s = run_local(cfg)
            wall = time.perf_counter() - t0
            stop.set()
            t.join()
            end = _bytes(out)
            if end["total"] > peak["total"]:
                peak.update(end)
            c = s.manifest["units"]["compaction"]
            row = {"samples": n, "units": s.manifest["units"]["total"], "compact_every": every, "wall_s": round(wall, 1),
                   "bytes_end": end, "bytes_peak_polled": peak, "compactions": c["compactions"]}
            log(f"{n} samples, compact_every={every}: end {end['total'] / 1e6:.2f} MB ({end['files']} files: partials "
                f"{end['partials'] / 1e6:.2f}, checkpoint {end['checkpoint'] / 1e6:.2f}, other {end['other'] / 1e6:.2f}), "
                f"peak {peak['total'] / 1e6:.2f} MB, {wall:.0f} s")
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def payload(layers: int, seq: int, batch: int, units_in_ckpt: int = 64) -> dict:
    from raysens.stats.cells import CellStats
    from raysens.store.checkpoint import Fold
    from raysens.store.partials import FORMAT, decode_partial, encode_partial

    def unit(u: int):
        rng = np.random.default_rng(u)
        ids = list(range(u * batch, (u + 1) * batch))
        causal = np.tril(np.ones((seq, seq)))
        states = {L: CellStats.from_batch(rng.lognormal(-2.0, 2.0, (batch, seq, seq)) * causal, sample_ids=ids)
                  for L in range(1, layers + 1)}
        meta = {"fingerprint": "f" * 16, "units": [ids[0]], "unit_ids": [ids], "computed_ids": ids, "skipped": {},
                "layers": list(range(1, layers + 1)), "compute_s": 1.0}
        return meta, states

    meta, states = unit(0)
    res = {"layers": layers, "seq": seq, "batch": batch}
    decode_partial(encode_partial(meta, states))  # warm-up
    for fmt in (FORMAT,):  # the only format encode_partial writes
        t0 = time.perf_counter()
        data = encode_partial(meta, states)
        t1 = time.perf_counter()
        decode_partial(data)
        t2 = time.perf_counter()
        res[f"format{fmt}"] = {"bytes": len(data), "encode_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3)}
        log(f"format {fmt}: {len(data) / 1e6:.2f} MB per unit, encode {t1 - t0:.2f} s, decode {t2 - t1:.2f} s")
    fold = Fold(range(1, layers + 1))
    for u in range(units_in_ckpt):
        m, st = unit(u)
        fold.add(decode_partial(encode_partial(m, st)), "/nonexistent")
    t0 = time.perf_counter()
    ck = fold.encode("f" * 16)
    res["checkpoint"] = {"units": units_in_ckpt, "bytes": len(ck), "encode_s": round(time.perf_counter() - t0, 3)}
    log(f"checkpoint of {units_in_ckpt} units: {len(ck) / 1e6:.2f} MB, encode {res['checkpoint']['encode_s']} s")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.rundir", description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["growth", "payload", "all"])
    ap.add_argument("--samples", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--layers", type=int, default=None, help="growth: 4 (synthetic:L4, all layers); payload: 28")
    ap.add_argument("--seq", type=int, default=None, help="growth: 16; payload: 64")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--compact-every", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--dir", default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res: dict = {}
    if args.mode in ("payload", "all"):
        res["payload"] = payload(args.layers or 28, args.seq or 64, args.batch)
    if args.mode in ("growth", "all"):
        work = Path(args.dir or tempfile.mkdtemp(prefix="raysens-rundir-"))
        work.mkdir(parents=True, exist_ok=True)
        res["growth"] = {"model": f"synthetic:L{args.layers or 4}", "seq": args.seq or 16, "batch": args.batch,
                         "rows": growth(args.samples, args.layers or 4, args.seq or 16, args.batch, args.compact_every, work)}
    if args.json:
        write_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
