"""What a paired run costs against two separate runs of the same samples (issue 29).

    python -m jobs.bench.paired_cost --samples 32 --seq 32 --rounds 2 --json jobs/results/paired_cost_minilm.json
    python -m jobs.bench.paired_cost units --units 6 --seq 32 --json jobs/results/paired_cost_minilm_units.json

MiniLM-L6 (offline), all 6 layers, S = 32, the run's default estimator, the in-process backend
(``cluster.use_ray: false``: the same units and worker as a Ray actor, without Ray's start-up). Side b
is MiniLM's random initialisation (``paired.random_init``). The "two separate runs" are two ordinary
runs of the same config on the same samples: one of MiniLM, one of the same shape (the second is
MiniLM again — a random-init model has no ordinary run of its own, and the cost of a forward/backward
does not depend on the weights' values). Variants alternate (paired, separate, paired, ...) so the
machine's load is shared; each round writes fresh run directories. Reported: wall time of each
(run() call, including model loading, tokenization, the final merge and the stats files) and the
workers' compute seconds (``timings.compute_s_total``), and the ratios paired / separate.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from jobs.harness import add_json_arg, alternate, log, write_json


def _config(out: Path, samples: int, seq: int, paired: bool):
    from raysens.config import load_config

    args = ["--model.name=minilm", "--layers=[1,2,3,4,5,6]", f"--data.limit={samples}", f"--data.max_seq_len={seq}",
            "--cluster.use_ray=false", "--output.plots=false", "--output.progress_every_s=60", f"--output.dir={out}"]
    if paired:
        args.append("--paired.random_init=true")
    return load_config(None, args)


def _one(out: Path, samples: int, seq: int, paired: bool) -> dict:
    from raysens.run.runner import run_local

    t0 = time.perf_counter()
    s = run_local(_config(out, samples, seq, paired))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "compute_s": float(s.manifest["timings"]["compute_s_total"])}


def measure(samples: int, seq: int, rounds: int) -> dict:
    from jobs.harness import provenance

    tmp = Path(tempfile.mkdtemp(prefix="paired-cost-"))
    rows: dict[str, list[dict]] = {"paired": [], "separate": []}
    try:
        for r, name in alternate(["paired", "separate"], rounds):
            if name == "paired":
                res = _one(tmp / f"p{r}", samples, seq, True)
            else:
                a, b = _one(tmp / f"a{r}", samples, seq, False), _one(tmp / f"b{r}", samples, seq, False)
                res = {k: a[k] + b[k] for k in a}
            rows[name].append(res)
            log(f"round {r} {name}: wall {res['wall_s']:.1f} s, compute {res['compute_s']:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("wall_s", "compute_s")} for n, v in rows.items()}
    return {"samples": samples, "seq": seq, "layers": 6, "model": "minilm", "side_b": "random_init", "rounds": rows,
            "median": med, "ratio_wall": med["paired"]["wall_s"] / med["separate"]["wall_s"],
            "ratio_compute": med["paired"]["compute_s"] / med["separate"]["compute_s"], "tree": provenance()}


def measure_units(n_units: int, seq: int, batch: int = 8) -> dict:
    """``units``: one process, the models loaded once; each unit of ``batch`` samples is computed by the
    paired worker and by two ordinary workers (the two separate runs), back to back, in alternating
    order, so the ratio of each adjacent pair sees the same load; reported: the median of the per-unit
    ratios (a loaded machine's drift cancels in each pair)."""
    from raysens.backends.units import UnitWorker, WorkerSpec, get_tokenizer, tokenize_unit
    from raysens.config import load_config
    from raysens.corpus.reader import Corpus

    cfg = _config(Path("/nonexistent"), n_units * batch, seq, True)
    side_b = cfg.paired.side_b
    spec = dict(model_name="minilm", trust_remote_code=False, device="cpu", sensitivity=cfg.sensitivity.to_dict(),
                layers=list(cfg.layers), max_seq_len=seq, fingerprint="bench")
    paired = UnitWorker(WorkerSpec(**spec, paired=side_b), shared={}, background=False)
    plain = [UnitWorker(WorkerSpec(**spec), shared={}, background=False) for _ in range(2)]
    tok, corpus = get_tokenizer("minilm", False), Corpus(load_config(None, [f"--data.limit={n_units * batch}"]).data)
    rows = []
    for i in range(n_units):
        ids = list(range(i * batch, (i + 1) * batch))
        u = tokenize_unit(ids, corpus.texts(ids), tok, seq, 2, True)
        t = {}
        for name in (("paired", "separate") if i % 2 == 0 else ("separate", "paired")):
            t0 = time.perf_counter()
            for w in ([paired] if name == "paired" else plain):
                w.fold(u)
                w.ship()
            t[name] = time.perf_counter() - t0
        rows.append({**t, "ratio": t["paired"] / t["separate"]})
        log(f"unit {i}: paired {t['paired']:.1f} s, two separate {t['separate']:.1f} s, ratio {rows[-1]['ratio']:.3f}")
    return {"units": n_units, "batch": batch, "seq": seq, "layers": 6, "model": "minilm", "side_b": "random_init",
            "rows": rows, "median_ratio": statistics.median(r["ratio"] for r in rows),
            "ratio_of_sums": sum(r["paired"] for r in rows) / sum(r["separate"] for r in rows)}


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["units"]:
        ap = argparse.ArgumentParser(description=measure_units.__doc__.split("\n")[0])
        ap.add_argument("--units", type=int, default=6)
        ap.add_argument("--seq", type=int, default=32)
        add_json_arg(ap)
        a = ap.parse_args(argv[1:])
        res = measure_units(a.units, a.seq)
        log(f"paired / two separate (per unit, median of {a.units}): {res['median_ratio']:.3f}; "
            f"ratio of sums {res['ratio_of_sums']:.3f}")
        write_json(res, a.json)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    add_json_arg(ap)
    a = ap.parse_args(argv)
    res = measure(a.samples, a.seq, a.rounds)
    log(f"paired / two separate runs: wall {res['ratio_wall']:.3f}, compute {res['ratio_compute']:.3f}")
    write_json(res, a.json)


if __name__ == "__main__":
    main()
