"""What a paired run costs against two separate runs of the same samples (issue 29).

    python -m jobs.bench.paired_cost --samples 32 --seq 32 --rounds 2 --json jobs/results/paired_cost_minilm.json

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


def main(argv=None) -> None:
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
