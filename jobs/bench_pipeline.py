"""Benchmarks of the distributed pipeline (not of the core engine: see jobs/benchmark.py).

    python jobs/bench_pipeline.py overhead [--model minilm] [--samples 96] [--seq-len 32] [--reps 2]
    python jobs/bench_pipeline.py memory [--sizes 1000 10000]
    python jobs/bench_pipeline.py all [--json out.json]

``overhead``: the Ray pipeline with one CPU actor against the in-process core (``run_local``) on the
same samples and the same work units. Both persist one partial per unit as it arrives; "steady" is
measured between the first and the last partial (units 2..n, start-up excluded): samples/s, and
CPU seconds per sample used by the driver and every process it started (GCS, raylet, Ray Data
workers, the actor) — the measure that a machine shared with other jobs disturbs least, especially
with one torch thread (``--threads 1``). End-to-end wall time and total CPU (start-up included) are
reported too. Runs alternate local / Ray so a change in machine load hits both.

``memory``: peak resident memory of the *driver* process (sampled every 50 ms in a thread, plus
``ru_maxrss``) for 1k and 10k samples of a tiny random-weight model on 2 CPU actors; each size runs
in a fresh process. The growth above the driver's memory once Ray is up is what must stay flat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _cfg(model: str, out: str, *extra: str):
    from raysens.config import load_config

    return load_config(None, [f"--model.name={model}", f"--output.dir={out}", "--output.plots=false",
                              "--output.progress_every_s=30", *extra])


class CpuMeter:
    """CPU seconds (user + system) used by this process and all its descendants (the embedded Ray:
    GCS, raylet, workers, actors), sampled every 0.2 s as a time series ``(time, cpu_s)``."""

    def __enter__(self):
        import psutil

        self.me = psutil.Process()
        self.seen: dict[int, float] = {}
        self.series: list[tuple[float, float]] = []
        self.stop = threading.Event()
        t = self.me.cpu_times()
        self.base = t.user + t.system
        self.th = threading.Thread(target=self._poll, daemon=True)
        self.th.start()
        return self

    def _total(self) -> float:
        import psutil

        for p in self.me.children(recursive=True):
            try:
                t = p.cpu_times()
                self.seen[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        t = self.me.cpu_times()
        return t.user + t.system - self.base + sum(self.seen.values())

    def _poll(self):
        while not self.stop.is_set():
            self.series.append((time.time(), self._total()))
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        self.th.join()
        self.cpu_s = self._total()

    def at(self, t: float) -> float:
        """CPU seconds used up to wall-clock time ``t`` (last sample at or before it)."""
        best = 0.0
        for ts, c in self.series:
            if ts <= t:
                best = c
        return best


def steady(run_dir: str, meter: CpuMeter) -> tuple[float, float]:
    """(samples/s, CPU seconds per sample) between the first and the last persisted partial."""
    import numpy as np

    files = sorted((p.stat().st_mtime, p) for p in (Path(run_dir) / "partials").glob("unit_*.npz"))
    n = 0
    for _, p in files[1:]:
        with np.load(p) as z:
            n += len(json.loads(str(z["meta"]))["sample_ids"])
    t0, t1 = files[0][0], files[-1][0]
    return n / (t1 - t0), (meter.at(t1) - meter.at(t0)) / n


def overhead(model: str, samples: int, seq_len: int, batch: int, reps: int, threads: int, layers: str = "[-1]") -> dict:
    import torch

    from raysens.pipeline import run, run_local

    torch.set_num_threads(threads)  # the in-process path uses this process's torch threads
    rows = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="rsbench") as tmp:
        for r in range(reps):
            for kind in ("local", "ray"):
                extra = [f"--data.limit={samples}", f"--data.max_seq_len={seq_len}", f"--cluster.batch_size={batch}",
                         "--cluster.num_actors=1", f"--cluster.torch_threads={threads}", f"--layers={layers}"]
                cfg = _cfg(model, f"{tmp}/{kind}{r}", *extra)
                t = time.perf_counter()
                with CpuMeter() as cpu:
                    s = (run_local if kind == "local" else run)(cfg)
                wall = time.perf_counter() - t
                rate, cpu_per_sample = steady(s.run_dir, cpu)
                rows[kind].append({"steady_samples_per_s": round(rate, 4), "steady_cpu_s_per_sample": round(cpu_per_sample, 4),
                                   "wall_s": round(wall, 1), "cpu_s": round(cpu.cpu_s, 1),
                                   "compute_s_total": s.manifest["timings"]["compute_s_total"],
                                   "load_avg_1m": os.getloadavg()[0]})
                print(f"[bench] {kind} rep {r}: {rows[kind][-1]}", file=sys.stderr, flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("steady_samples_per_s", "steady_cpu_s_per_sample",
                                                                "wall_s", "cpu_s", "compute_s_total")}
           for k, v in rows.items()}
    return {"model": model, "samples": samples, "seq_len": seq_len, "batch_size": batch, "reps": reps,
            "torch_threads": threads, "layers": layers, "runs": rows, "median": med,
            "ray_overhead_steady_pct": round(100.0 * (1.0 - med["ray"]["steady_samples_per_s"]
                                                      / med["local"]["steady_samples_per_s"]), 1),
            "ray_overhead_steady_cpu_pct": round(100.0 * (med["ray"]["steady_cpu_s_per_sample"]
                                                          / med["local"]["steady_cpu_s_per_sample"] - 1.0), 1),
            "ray_overhead_cpu_pct": round(100.0 * (med["ray"]["cpu_s"] / med["local"]["cpu_s"] - 1.0), 1),
            "ray_overhead_wall_pct": round(100.0 * (med["ray"]["wall_s"] / med["local"]["wall_s"] - 1.0), 1)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_child(samples: int, tmp: str) -> dict:
    """Runs in a fresh process: the driver whose memory is measured."""
    from raysens.corpus import bundled_corpus_path
    from raysens.distributed.raypipe import connect
    from raysens.pipeline import run

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

    base = _rss_mb()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    s = run(cfg)
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    ray.shutdown()
    return {"samples": samples, "computed": s.manifest["samples"]["computed"], "units": s.manifest["units"]["total"],
            "wall_s": round(wall, 1), "driver_rss_before_run_mb": round(base, 1),
            "driver_rss_peak_mb": round(peak[0], 1), "driver_rss_growth_mb": round(peak[0] - base, 1),
            "driver_ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def memory(sizes: list[int]) -> list[dict]:
    out = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="rsmem") as tmp:
            p = subprocess.run([sys.executable, __file__, "_memory_child", str(n), tmp], capture_output=True,
                               text=True, timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(f"memory run for {n} samples failed:\n{p.stderr[-3000:]}")
            out.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"[bench] memory {n}: {out[-1]}", file=sys.stderr, flush=True)
    return out


def machine() -> dict:
    import platform

    import ray
    import torch

    return {"cpus": len(os.sched_getaffinity(0)), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    c = sub.add_parser("_memory_child")
    c.add_argument("samples", type=int)
    c.add_argument("tmp")
    args = ap.parse_args(argv)
    if args.cmd == "_memory_child":
        print(json.dumps(_memory_child(args.samples, args.tmp)))
        return 0
    res = {"machine": machine()}
    if args.cmd in ("overhead", "all"):
        res["overhead"] = overhead(args.model, args.samples, args.seq_len, args.batch, args.reps, args.threads, args.layers)
    if args.cmd in ("memory", "all"):
        res["memory"] = memory(args.sizes)
    res["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
