"""``SensitivityConfig.precision`` bf16 against fp32 (docs/DESIGN.md §1.12), side by side in one
process, alternating.

    python -m jobs.bench.precision [--models smollm2 minilm] [--parts speed,error,hutch]
                                   [--samples 8] [--seq-len 32] [--error-samples 2] [--error-seq-len 12]
                                   [--rounds 2] [--json PATH]
    python -m jobs.bench.benchmark precision ...          # the same, through the dispatcher

Parts: ``speed`` — every layer, Hutchinson K=1, forward mode (the default ``auto`` picks it), fp32 and
bf16 alternating ``--rounds`` times: seconds per sample and the ratio (target ≥ 2.5× for SmolLM2),
and per layer the distance of bf16's mean map over the samples from fp32's (the same probes);
``error`` — exact maps at three depths (1, n/2, n), per layer the relative Frobenius distance of
bf16 from fp32: per map (mean and max over samples) and of the mean map over the samples (bound
``raysens.core.passes.precision.BF16_MAP_BOUND``); ``hutch`` — the dataset mean of Hutchinson K=1 at those
depths: bf16 vs fp32 with the same probes, next to the probe's own error (fp32 K=1 vs the exact
mean). Results: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from jobs.harness import log, write_json

from .common import engine, make_inputs, rel_fro


def speed(model, ids, am, layers, rounds) -> dict:
    """fp32 and bf16 (Hutchinson K=1, auto mode) alternating; best s/sample of each and fp32/bf16."""
    eng = {p: engine(model, precision=p) for p in ("fp32", "bf16")}
    for e in eng.values():  # warm-up (and bf16 weight copies) on one sample, untimed
        e.compute(ids[:1], am[:1], layers=layers)
    t: dict = {p: [] for p in eng}
    res = {}
    for _ in range(max(1, rounds)):
        for p, e in eng.items():
            t0 = time.perf_counter()
            r = res[p] = e.compute(ids, am, layers=layers, sample_ids=list(range(len(ids))))
            t[p].append((time.perf_counter() - t0) / len(ids))
            log(f"   {p}: {t[p][-1]:.3f} s/sample ({r.mode}, {r.strategy})")
    best = {p: min(v) for p, v in t.items()}
    # the same probes (seed 0) in both: the mean map's distance is bf16's rounding alone
    err = {str(L): rel_fro(res["bf16"].values[L].mean(0), res["fp32"].values[L].mean(0)) for L in layers[1:]}
    return {"s_per_sample": best, "all_s_per_sample": t, "speedup_bf16": best["fp32"] / best["bf16"],
            "mode": r.mode, "strategy": r.strategy, "k1_mean_map_rel_err_bf16_vs_fp32": err,
            "k1_mean_map_rel_err_max": max(err.values())}


def map_errors(model, ids, am, depths) -> dict:
    """Exact maps in fp32 and bf16 at ``depths``: per layer the relative Frobenius distance per map
    (mean, max over samples) and of the mean map over the samples."""
    res = {p: engine(model, estimator="exact", mode="forward", precision=p).compute(ids, am, layers=depths)
           for p in ("fp32", "bf16")}
    a, b = res["fp32"], res["bf16"]
    out = {}
    for L in depths:
        per = [rel_fro(b.values[L][i], a.values[L][i]) for i in range(len(ids))]
        out[str(L)] = {"per_map_mean": float(np.mean(per)), "per_map_max": float(np.max(per)),
                       "mean_map": rel_fro(b.values[L].mean(0), a.values[L].mean(0))}
    return out, a


def hutch_errors(model, ids, am, depths, exact, seeds=(0, 1, 2)) -> dict:
    """Dataset mean of Hutchinson K=1: bf16 vs fp32 with the same probes, and fp32 vs the exact mean
    (the probe's own error), averaged over ``seeds``."""
    ex = {L: exact.values[L].mean(0) for L in depths}
    bf, probe = {L: [] for L in depths}, {L: [] for L in depths}
    for s in seeds:
        r = {p: engine(model, num_probes=1, seed=s, mode="forward", precision=p).compute(ids, am, layers=depths)
             for p in ("fp32", "bf16")}
        for L in depths:
            m32, m16 = r["fp32"].values[L].mean(0), r["bf16"].values[L].mean(0)
            bf[L].append(rel_fro(m16, m32))
            probe[L].append(rel_fro(m32, ex[L]))
    return {str(L): {"bf16_vs_fp32": float(np.mean(bf[L])), "probe_vs_exact": float(np.mean(probe[L]))}
            for L in depths}


def bench_model(name, args, parts) -> dict:
    from raysens.core.models import load_model

    lm = load_model(name)
    n = lm.model.config.num_hidden_layers
    out = {"model": name, "layers": n}
    if "speed" in parts:
        ids, am = make_inputs(lm.tokenizer, args.samples, args.seq_len)
        log(f"{name}: all {n} layers, K=1, S={args.seq_len}, {args.samples} samples, fp32 vs bf16")
        out["speed"] = speed(lm.model, ids, am, list(range(n + 1)), args.rounds)
        log(f"{name}: bf16 {out['speed']['speedup_bf16']:.2f}x faster than fp32")
    if parts & {"error", "hutch"}:
        depths = sorted({1, n // 2, n})
        ids, am = make_inputs(lm.tokenizer, args.error_samples, args.error_seq_len, offset=3)
        out["error_seq_len"], out["error_samples"], out["depths"] = args.error_seq_len, args.error_samples, depths
        err, exact = map_errors(lm.model, ids, am, depths)
        out["exact_map_rel_err"] = err
        log(f"{name}: exact maps, bf16 vs fp32: {json.dumps(err)}")
        if "hutch" in parts:
            out["hutchinson_k1_mean_rel_err"] = h = hutch_errors(lm.model, ids, am, depths, exact)
            log(f"{name}: Hutchinson K=1 dataset mean: {json.dumps(h)}")
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    ap.add_argument("--parts", default="speed,error,hutch")
    ap.add_argument("--samples", type=int, default=8, help="speed: samples per compute call")
    ap.add_argument("--seq-len", type=int, default=32, help="speed: tokens per sample")
    ap.add_argument("--error-samples", type=int, default=2, help="error/hutch: samples (exact maps cost S·d_model passes)")
    ap.add_argument("--error-seq-len", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.precision", description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    res = {"torch_threads": torch.get_num_threads(), "models": [bench_model(m, args, parts) for m in args.models]}
    write_json(res, args.json, echo=True)
    return res


if __name__ == "__main__":
    main()
