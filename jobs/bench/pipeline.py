"""Benchmarks of the distributed pipeline (not of the core engine: see jobs/bench/benchmark.py).

Launch from the repository root with raysens installed (by hand, not in CI; also reachable as
``python -m jobs.bench.benchmark pipeline ...`` with the same arguments)::

    python -m jobs.bench.pipeline overhead [--model minilm] [--samples 96] [--seq-len 32] [--reps 2]
    python -m jobs.bench.pipeline overhead --model smollm2 --threads 1 --json jobs/results/pipeline_overhead_smollm2.json
    python -m jobs.bench.pipeline memory [--sizes 1000 10000] [--json jobs/results/pipeline_memory.json]
    python -m jobs.bench.pipeline all [--json out.json]

``overhead``: the Ray pipeline with one CPU actor against the in-process core (``run_local``) on the
same samples and the same work units. Each path runs N and 2N samples; the difference divided by N
is its steady cost per sample (start-up cancels out): wall seconds, CPU seconds of the driver and
every process it started (GCS, raylet, Ray Data workers, the actor) — the measure that a machine
shared with other jobs disturbs least, especially with one torch thread (``--threads 1``) — and the
engine's own seconds. Ray's extra start-up cost is reported separately. Runs alternate local / Ray.

``memory``: peak resident memory of the *driver* process (sampled every 50 ms in a thread, plus
``ru_maxrss``) for 1k and 10k samples of a tiny random-weight model on 2 CPU actors; each size runs
in a fresh process (``jobs.harness.run_child`` of ``memory_child``). The
growth above the driver's memory once Ray is up is what must stay flat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from jobs.harness import RssSampler, log, maxrss_mib, run_child, write_json

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _cfg(model: str, out: str, *extra: str):
    from raysens.config import load_config

    return load_config(None, [f"--model.name={model}", f"--output.dir={out}", "--output.plots=false",
                              "--output.progress_every_s=30", *extra])


class CpuMeter:
    """CPU seconds (user + system) used by this process and all its descendants (the embedded Ray:
    GCS, raylet, Ray Data workers, the actor); descendants are sampled every 0.2 s."""

    def __enter__(self):
        import psutil

        self.me = psutil.Process()
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.base = sum(self.me.cpu_times()[:2])
        self.th = threading.Thread(target=self._poll, daemon=True)
        self.th.start()
        return self

    def _poll(self):
        import psutil

        while not self.stop.is_set():
            for p in self.me.children(recursive=True):
                try:
                    self.seen[p.pid] = sum(p.cpu_times()[:2])
                except psutil.Error:
                    pass
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        self.th.join()
        self.cpu_s = sum(self.me.cpu_times()[:2]) - self.base + sum(self.seen.values())


def overhead(model: str, samples: int, seq_len: int, batch: int, reps: int, threads: int, layers: str = "[-1]") -> dict:
    """Each path runs N and 2N samples; (cost(2N) - cost(N)) / N is its steady cost per sample, with
    every start-up cost (Ray, workers, model load, plots) cancelling out."""
    import torch

    from raysens.run.runner import run, run_local

    torch.set_num_threads(threads)  # the in-process path uses this process's torch threads
    runs = []
    with tempfile.TemporaryDirectory(prefix="rsbench") as tmp:
        # discarded warm-up of the in-process path: its first run in this process paid one-off costs
        # (imports, the model's first load) that made the 1st N-sample run 4-5 s slower than the next
        warm = _cfg(model, f"{tmp}/warm", f"--data.limit={batch}", f"--data.max_seq_len={seq_len}",
                    f"--cluster.batch_size={batch}", "--cluster.num_actors=1", f"--layers={layers}")
        run_local(warm)
        for r in range(reps):
            for n in (samples, 2 * samples):
                for kind in ("local", "ray"):
                    cfg = _cfg(model, f"{tmp}/{kind}{n}-{r}", f"--data.limit={n}", f"--data.max_seq_len={seq_len}",
                               f"--cluster.batch_size={batch}", "--cluster.num_actors=1",
                               f"--cluster.torch_threads={threads}", f"--layers={layers}")
                    t = time.perf_counter()
                    with CpuMeter() as cpu:
                        s = (run_local if kind == "local" else run)(cfg)
                    runs.append({"kind": kind, "samples": n, "rep": r, "wall_s": round(time.perf_counter() - t, 2),
                                 "cpu_s": round(cpu.cpu_s, 2), "engine_s": s.manifest["timings"]["compute_s_total"],
                                 "load_avg_1m": round(os.getloadavg()[0], 1)})
                    log(f"[bench] {runs[-1]}", err=True)

    def med(kind, n, key):
        return statistics.median(x[key] for x in runs if x["kind"] == kind and x["samples"] == n)

    out = {"model": model, "layers": layers, "samples": [samples, 2 * samples], "seq_len": seq_len,
           "batch_size": batch, "reps": reps, "torch_threads": threads, "runs": runs}
    for x in runs:  # time outside the engine: Ray's start-up, scheduling, transfers, the driver's merge
        x["nonengine_s"] = round(x["wall_s"] - x["engine_s"], 2)
    for key in ("cpu_s", "wall_s", "engine_s", "nonengine_s"):
        for kind in ("local", "ray"):
            out[f"{kind}_steady_{key}_per_sample"] = round((med(kind, 2 * samples, key) - med(kind, samples, key))
                                                           / samples, 4)
        if key != "nonengine_s":
            out[f"ray_overhead_steady_{key}_pct"] = round(100 * (out[f"ray_steady_{key}_per_sample"]
                                                                 / out[f"local_steady_{key}_per_sample"] - 1), 1)
    for key in ("cpu_s", "wall_s"):
        out[f"ray_startup_extra_{key}"] = round(med("ray", samples, key) - med("local", samples, key)
                                                - samples * (out[f"ray_steady_{key}_per_sample"]
                                                             - out[f"local_steady_{key}_per_sample"]), 1)
    return out


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process (``spec``: samples, tmp): the driver whose memory is measured."""
    samples, tmp = spec["samples"], spec["tmp"]
    from raysens.backends.ray_pool import connect
    from raysens.run.runner import run
    from raysens.corpus.reader import bundled_corpus_path

    texts = [json.loads(line)["text"] for line in open(bundled_corpus_path())]
    src = Path(tmp) / "corpus.jsonl"
    with open(src, "w") as f:  # `samples` rows of real text (the bundled corpus, cycled)
        for i in range(samples):
            f.write(json.dumps({"text": texts[i % len(texts)]}) + "\n")
    del texts
    cfg = _cfg("random:tiny-llama", f"{tmp}/run", f"--data.source={src}", "--data.max_seq_len=8",
               "--cluster.batch_size=32", "--cluster.num_actors=2", "--layers=[1,-1]")
    connect(cfg.cluster)  # Ray up first: the baseline includes it
    import ray

    with RssSampler(every_s=0.05) as rss:
        base = rss.first_mib
        t = time.perf_counter()
        s = run(cfg)
        wall = time.perf_counter() - t
    ray.shutdown()
    return {"samples": samples, "computed": s.manifest["samples"]["computed"], "units": s.manifest["units"]["total"],
            "wall_s": round(wall, 1), "driver_rss_before_run_mb": round(base, 1),
            "driver_rss_peak_mb": round(rss.peak_mib, 1), "driver_rss_growth_mb": round(rss.peak_mib - base, 1),
            "driver_ru_maxrss_mb": round(maxrss_mib(), 1)}


def memory(sizes: list[int]) -> list[dict]:
    out = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="rsmem") as tmp:
            out.append(run_child("jobs.bench.pipeline:memory_child", {"samples": n, "tmp": tmp}, timeout=3600))
            log(f"[bench] memory {n}: {out[-1]}", err=True)
    return out


def machine() -> dict:
    import platform

    import ray
    import torch

    return {"cpus": len(os.sched_getaffinity(0)), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.pipeline", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("overhead")
    m = sub.add_parser("memory")
    a = sub.add_parser("all")
    for p in (o, a):
        p.add_argument("--model", default="minilm")
        p.add_argument("--samples", type=int, default=96)
        p.add_argument("--seq-len", type=int, default=32)
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--reps", type=int, default=2)
        p.add_argument("--threads", type=int, default=2, help="torch threads, in-process and in the actor")
        p.add_argument("--layers", default="[-1]", help="target layers, as in --layers=[15]")
    for p in (m, a):
        p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    for p in (o, m, a):
        p.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    res = {"machine": machine()}
    if args.cmd in ("overhead", "all"):
        res["overhead"] = overhead(args.model, args.samples, args.seq_len, args.batch, args.reps, args.threads, args.layers)
    if args.cmd in ("memory", "all"):
        res["memory"] = memory(args.sizes)
    res["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    write_json(res, args.json, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
