"""Fused tangent kernels against eager (issue 30): forward mode, every layer, Hutchinson K=1, S=32.

    python -m jobs.bench.fusion                                    # SmolLM2 + MiniLM, 8 samples, 5 rounds
    python -m jobs.bench.fusion --models smollm2 --threads 2 --rounds 5 --json jobs/results/i30_fusion.json
    python -m jobs.bench.fusion --kernels                          # per kernel on SmolLM2 shapes only
    python -m jobs.bench.fusion --kernels --cpp-wrapper            # the same with inductor's C++ wrapper

One child process per model (``jobs.harness.run_child``) with a fresh, empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR``: the compile time is a cold one, what the first actor on a machine pays;
later actors on the same machine find the cache). In it: an engine with ``fusion: eager`` and one with
``fusion: compile`` are built (the second's construction time minus the first's is the trial compile),
each warms up on 2 samples (the fused warm-up minus the eager one: compiles for the real shapes),
then ``--rounds`` rounds alternate eager, fused and a 2048² fp32 ``torch.matmul`` (the machine's rate
in the same process, between the variants: the machine is shared). Printed per variant: median and
range of s/sample, the FLOP floor's rate (as in ``forward_rate.py``) as a fraction of the median
matmul rate; the fused/eager speed-up; the K=1 mean maps' distance (fused vs eager); the compile
time (the trial's, and every cache key's first call: ``Kernels.compile_s_total``), the cache keys per
kernel and dynamo's graphs per key (1: no recompile), and its break-even in samples (compile s / saving per sample) against the quick start (64
samples, K=2: about twice the K=1 work per sample) and a 10k-sample cell. No Ray.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from jobs.bench.common import alternate_rounds, forward_child, forward_floor, rel_fro
from jobs.harness import log, run_child, write_json


def child(spec: dict) -> dict:
    """One model: eager and fused engines alternating in this process (``spec``: model, samples,
    seq_len, rounds, threads)."""
    from raysens.core.engine import SensitivityConfig, SensitivityEngine

    lm, layers, ids, am = forward_child(spec)
    n = layers[-1]
    engines, build_s, warm_s = {}, {}, {}
    for name in ("eager", "compile"):
        t0 = time.perf_counter()
        engines[name] = SensitivityEngine(lm.model, SensitivityConfig(num_probes=1, mode="forward", fusion=name))
        build_s[name] = time.perf_counter() - t0
        assert engines[name].fusion_used == name, (name, engines[name].fusion_used)
    for name, e in engines.items():
        t0 = time.perf_counter()
        e.compute(ids[:2], am[:2], layers=layers)  # warm-up, untimed in the rates
        warm_s[name] = time.perf_counter() - t0
    floor = forward_floor(engines["eager"], spec["seq_len"])
    times, mm, maps = alternate_rounds(engines, ids, am, layers, spec["rounds"])
    diff = max(rel_fro(maps["compile"][L], maps["eager"][L]) for L in layers[1:])
    dyn = {}
    try:
        from torch._dynamo.utils import counters

        dyn = {k: int(v) for k, v in counters["stats"].items()}
    except Exception:  # noqa: BLE001 (a private counter: report what is there)
        pass
    kern = engines["compile"]._manual.kern
    return {"model": spec["model"], "layers": n, "threads": torch.get_num_threads(), "floor_gflop_per_sample": floor / 1e9,
            "s_per_sample": times, "matmul_gflops": mm, "build_s": build_s, "warmup_s": warm_s,
            "trial_compile_s": kern.compile_s, "mean_map_rel_diff": diff, "dynamo_stats": dyn,
            "compile_s_all_keys": kern.compile_s_total(), "cache_keys": {c.f.__name__: len(c.by_key) for c in kern.parts},
            "graphs_per_key": {c.f.__name__: c.graphs() for c in kern.parts},
            "cpp_wrapper": bool(torch._inductor.config.cpp_wrapper)}


def kernels(spec: dict) -> dict:
    """Each elementwise kernel (and the whole attention tangent) on SmolLM2-shaped tangents of one
    suffix segment (``spec``: chunk, batch, P, threads), eager vs fused alternating, median ms of
    ``reps`` calls (short calls: less exposed to a loaded machine than whole runs)."""
    from raysens.core.stacks import fusion

    torch.set_num_threads(spec["threads"])
    c, b, p = spec["chunk"], spec["batch"], spec["P"]
    d, hh, kvh, hd, inter, s = 576, 9, 3, 64, 1536, 32
    g = torch.Generator().manual_seed(0)

    def rn(*sh):
        return torch.randn(*sh, generator=g)

    fused = fusion.pick_kernels("compile", torch.device("cpu"))
    dx, xn, r, w = rn(c, b, p, d), rn(b, p, d), rn(b, p, 1).abs(), rn(d)
    q, cs, sn = rn(c, b, p, hh, hd), rn(b, p, 1, hd), rn(b, p, 1, hd)
    gg, uu, ab = rn(c, b, p, inter), rn(c, b, p, inter), rn(b, p, 2, inter)
    pr = torch.softmax(rn(b, hh, p, s), -1)
    att = ((rn(c, b, p, hh, hd), rn(c, b, p, kvh, hd), rn(c, b, p, kvh, hd)), rn(b, hh, p, hd), rn(b, kvh, s, hd),
           rn(b, kvh, s, hd), pr, 0.125)
    cases = {"rms_tangent": lambda k: k.rms_tangent(dx, xn, r, w, torch.float32),
             "rope": lambda k: k.rope(q, cs, sn), "gate": lambda k: k.gate(gg, uu, ab),
             "attention_tangent": lambda k: k.attention(*att)}
    out = {}
    with torch.no_grad():
        for name, f in cases.items():
            ts = {"eager": [], "compile": []}
            for k in (fusion.EAGER, fused):
                f(k)
            for _ in range(spec["reps"]):
                for k in (fusion.EAGER, fused):
                    t0 = time.perf_counter()
                    f(k)
                    ts[k.name].append((time.perf_counter() - t0) * 1e3)
            e, cc = statistics.median(ts["eager"]), statistics.median(ts["compile"])
            out[name] = {"eager_ms": e, "compile_ms": cc, "speedup": e / cc}
    return out


def summarize(r: dict) -> dict:
    gf = statistics.median(r["matmul_gflops"])
    out = {"matmul_gflops_median": gf, "matmul_gflops_range": [min(r["matmul_gflops"]), max(r["matmul_gflops"])]}
    for name, ts in r["s_per_sample"].items():
        med = statistics.median(ts)
        rate = r["floor_gflop_per_sample"] / med
        out[name] = {"s_per_sample_median": med, "range": [min(ts), max(ts)], "floor_gflops": rate,
                     "fraction_of_matmul": rate / gf}
    e, c = out["eager"]["s_per_sample_median"], out["compile"]["s_per_sample_median"]
    compile_s = (r["build_s"]["compile"] - r["build_s"]["eager"]) + max(0.0, r["warmup_s"]["compile"] - r["warmup_s"]["eager"])
    saving = e - c
    out.update(speedup=e / c, compile_s=compile_s, saving_s_per_sample_k1=saving,
               break_even_samples_k1=(compile_s / saving if saving > 0 else None),
               quickstart_net_s=64 * 2 * saving - compile_s, cell_10k_net_s=10_000 * saving - compile_s)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.fusion", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", action="store_true", help="time the kernels alone (SmolLM2 shapes)")
    ap.add_argument("--cpp-wrapper", action="store_true",
                    help="inductor's C++ wrapper (TORCHINDUCTOR_CPP_WRAPPER=1) in the child: less Python per call")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    env = {"TORCHINDUCTOR_CPP_WRAPPER": "1"} if args.cpp_wrapper else {}
    if args.kernels:
        spec = {"chunk": 2, "batch": 8, "P": 16, "threads": args.threads, "reps": 30}
        res = run_child("jobs.bench.fusion:kernels", spec, env=env)
        for name, v in res.items():
            log(f"{name:18s} [chunk 2, batch 8, P 16, SmolLM2 widths, {args.threads} threads]: eager "
                f"{v['eager_ms']:.2f} ms, fused {v['compile_ms']:.2f} ms ({v['speedup']:.2f}×)")
        write_json({"kernels": res, "spec": spec}, args.json)
        return 0
    res = {"models": []}
    for m in args.models:
        spec = {"model": m, "samples": args.samples, "seq_len": args.seq_len, "rounds": args.rounds, "threads": args.threads}
        with tempfile.TemporaryDirectory(prefix="raysens-inductor-") as cache:  # a cold compile
            r = run_child("jobs.bench.fusion:child", spec, env={"TORCHINDUCTOR_CACHE_DIR": cache, **env})
        s = summarize(r)
        res["models"].append({"raw": r, "summary": s})
        log(f"{m} ({r['layers']} layers, S={args.seq_len}, K=1, {r['threads']} threads, {args.rounds} rounds): "
            f"matmul 2048² median {s['matmul_gflops_median']:.0f} GFLOP/s "
            f"[{s['matmul_gflops_range'][0]:.0f}, {s['matmul_gflops_range'][1]:.0f}]")
        for name in ("eager", "compile"):
            v = s[name]
            log(f"  {name:7s}: {v['s_per_sample_median']:.3f} s/sample [{v['range'][0]:.3f}, {v['range'][1]:.3f}], "
                f"{v['floor_gflops']:.1f} GFLOP/s = {v['fraction_of_matmul']:.2f} of the matmul rate")
        be = s["break_even_samples_k1"]
        log(f"  fused/eager speed-up {s['speedup']:.3f}×; mean maps fused vs eager {r['mean_map_rel_diff']:.1e}; "
            f"compile {s['compile_s']:.1f} s (trial {r['trial_compile_s']:.1f} s; all keys {r['compile_s_all_keys']:.1f} s, "
            f"keys {r['cache_keys']}, graphs per key {r['graphs_per_key']}) cold; break-even "
            f"{'never' if be is None else f'{be:.0f} K=1 samples'}; quick start (64 × K=2) net "
            f"{s['quickstart_net_s']:+.0f} s, 10k-sample cell (K=1) net {s['cell_10k_net_s']:+.0f} s")
    write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
