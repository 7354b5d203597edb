"""Forward vs reverse mode (docs/DESIGN.md §1.10), side by side in one process, alternating.

    python -m jobs.bench.modes [--models smollm2 minilm] [--samples 8] [--batch 8] [--seq-len 32]
                               [--rounds 1] [--parts all,last,exact,quality] [--json PATH]
    python -m jobs.bench.benchmark modes ...          # the same, through the dispatcher

Parts: ``all`` — every layer, Hutchinson K=1: seconds per sample of each mode, the ratio, and each
against the FLOP floor of its passes (reverse: Σ_L one floor per layer of depth L; forward: one
floor at the deepest layer); ``last`` — last layer only: forward, reverse and ``auto`` (which should
be within 5 % of the faster); ``exact`` — exact, all layers, MiniLM S=16; ``quality`` — relative
error against exact of forward and reverse Hutchinson at K=1 and K=4 at three depths (equal cost:
both modes run S·K passes per sample). Results: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from jobs.harness import log, write_json

from .common import block_params, engine, floor_flops, make_inputs, rel_fro


def _time(eng, ids, am, layers, rounds):
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        res = eng.compute(ids, am, layers=layers, sample_ids=list(range(len(ids))))
        best = min(best, time.perf_counter() - t0)
    return best / len(ids), res


def _bench_model(name, args, parts):
    from raysens.core.models import load_model

    lm = load_model(name)
    n = lm.model.config.num_hidden_layers
    out = {"model": name, "layers": n}
    seq = args.seq_len
    ids, am = make_inputs(lm.tokenizer, args.samples, seq)
    causal = name != "minilm"
    eng = {m: engine(lm.model, mode=m) for m in ("forward", "reverse", "auto")}
    npar = block_params(eng["reverse"])
    floor1 = floor_flops(npar, seq, 1, causal) / n  # one block's share per sample
    if "all" in parts:
        layers = list(range(n + 1))
        t = {m: 0.0 for m in ("forward", "reverse")}
        for m in ("forward", "reverse") * max(1, args.rounds):  # alternating
            s, r = _time(eng[m], ids, am, layers, 1)
            t[m] = s if not t[m] else min(t[m], s)
            log(f"{name} all layers {m}: {s:.3f} s/sample ({r.strategy})")
        fl = {"forward": floor1 * n, "reverse": floor1 * sum(max(L, 0.5) for L in layers)}
        out["all_layers"] = {"s_per_sample": t, "ratio_reverse_over_forward": t["reverse"] / t["forward"],
                             "floor_gflop": {m: v / 1e9 for m, v in fl.items()},
                             "gflop_per_s": {m: fl[m] / 1e9 / t[m] for m in t},
                             "auto_picks": eng["auto"].mode_for(layers, seq).value}
    if "last" in parts:
        t = {}
        for m in ("forward", "reverse", "auto") * max(1, args.rounds):  # alternating
            s, r = _time(eng[m], ids, am, [n], 1)
            t[m] = min(t.get(m, s), s)
            log(f"{name} last layer {m}: {s:.3f} s/sample ({r.mode}, {r.strategy})")
        fastest = min(t["forward"], t["reverse"])
        out["last_layer"] = {"s_per_sample": t, "auto_picks": eng["auto"].mode_for([n], seq).value,
                             "auto_over_fastest": t["auto"] / fastest}
    if "exact" in parts and name == "minilm":
        ids16, am16 = make_inputs(lm.tokenizer, min(2, args.samples), 16)
        ex = {m: engine(lm.model, estimator="exact", mode=m) for m in ("forward", "reverse")}
        t = {}
        for m in ("forward", "reverse"):
            t[m], _ = _time(ex[m], ids16, am16, list(range(n + 1)), 1)
        out["exact_all_layers_S16"] = {"s_per_sample": t, "ratio_reverse_over_forward": t["reverse"] / t["forward"]}
    if "quality" in parts:
        depths = sorted({1, n // 2, n})
        qn = min(4, args.samples)
        qids, qam = ids[:qn], am[:qn]
        exact = engine(lm.model, estimator="exact", mode="forward").compute(qids, qam, layers=depths)
        q = {}
        for k in (1, 4):
            for m in ("forward", "reverse"):
                errs = {L: [] for L in depths}
                for seed in range(3):
                    r = engine(lm.model, num_probes=k, seed=seed, mode=m).compute(qids, qam, layers=depths)
                    for L in depths:
                        for i in range(qn):
                            v = exact.mask[i]
                            errs[L].append(rel_fro(r.values[L][i][v], exact.values[L][i][v]))
                q[f"{m}_K{k}"] = {str(L): float(np.mean(e)) for L, e in errs.items()}
                log(f"{name} quality {m} K={k}: {q[f'{m}_K{k}']}")
        out["quality_rel_err_vs_exact"] = q
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="samples per compute call (= --samples here)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--parts", default="all,last,exact,quality")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.modes", description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    res = {"torch_threads": torch.get_num_threads(), "seq_len": args.seq_len, "samples": args.samples,
           "models": [_bench_model(m, args, parts) for m in args.models]}
    write_json(res, args.json, echo=True)
    return res


if __name__ == "__main__":
    main()
