"""Forward mode against the machine's matmul rate (issue 20): every layer, Hutchinson K=1, fp32.

    python -m jobs.bench.forward_rate                                  # SmolLM2 + MiniLM, S=32, 8 samples
    python -m jobs.bench.forward_rate --threads 2 --rounds 3 --baseline-tree /tmp/main-checkout \
        --json jobs/results/forward_rate.json                         # this tree vs another, alternately
    python -m jobs.bench.forward_rate --tokens 1024 2048 4096         # backward_tokens values side by side

Every measurement is one child process (``jobs.harness.run_child`` of ``child``, with ``raysens``
from this checkout or from ``--baseline-tree``): it loads the model, warms up on 2 samples,
times one ``compute`` of the samples (all layers, forward mode, K=1, ``backward_tokens`` as given)
and a 2048² fp32 ``torch.matmul`` at the same thread count. Trees and token values alternate for
``--rounds`` rounds; the best time of each counts, and the best matmul of the whole command is the
machine's rate for every variant. Printed per variant: s/sample (and as a speedup over the first),
the FLOP floor's rate (``N·S(S+1)`` FLOPs per sample for a causal model, forward tangents over the
suffixes; ``2·N·S²`` otherwise; N = the blocks' parameters) and that rate as a fraction of the
matmul rate — the issue's target is ≥ 0.65 for SmolLM2 (0.52 before). No Ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from jobs.bench.common import forward_child, forward_floor, matmul_gflops, rel_fro
from jobs.harness import alternate, log, run_child, trees, write_json


def child(spec: dict) -> dict:
    """One timed measurement in this process (``spec``: model, samples, seq_len, tokens, threads)."""
    from raysens.core.engine import SensitivityConfig, SensitivityEngine

    lm, layers, ids, am = forward_child(spec)
    n = layers[-1]
    e = SensitivityEngine(lm.model, SensitivityConfig(num_probes=1, mode="forward", backward_tokens=spec["tokens"]))
    floor = forward_floor(e, spec["seq_len"])  # FLOPs per sample
    e.compute(ids[:2], am[:2], layers=layers)  # warm-up, untimed
    t0 = time.perf_counter()
    r = e.compute(ids, am, layers=layers, sample_ids=list(range(len(ids))))
    s = (time.perf_counter() - t0) / len(ids)
    mean = {L: r.values[L].mean(0) for L in (1, n // 2, n)}
    import raysens

    return {"raysens": str(Path(raysens.__file__).parent), "s_per_sample": s, "floor_gflop_per_sample": floor / 1e9,
            "matmul_gflops": matmul_gflops(n=2048, reps=5),
            "strategy": r.strategy, "layers": n, "threads": torch.get_num_threads(),
            "mean_maps": {str(L): m.tolist() for L, m in mean.items()}}


def bench_model(name: str, args) -> dict:
    roots = trees(args.baseline_tree)
    order = ["baseline", "this"] if args.baseline_tree else ["this"]  # the baseline first: speedups are over it
    variants = [(t, k) for t in order for k in args.tokens]
    runs: dict = {v: [] for v in variants}
    for _, (tree, tok) in alternate(variants, args.rounds):
        spec = {"model": name, "samples": args.samples, "seq_len": args.seq_len, "tokens": tok, "threads": args.threads}
        r = run_child("jobs.bench.forward_rate:child", spec, tree=roots[tree])
        runs[(tree, tok)].append(r)
        log(f"  {name} {tree} tokens={tok}: {r['s_per_sample']:.3f} s/sample, matmul {r['matmul_gflops']:.0f} "
            f"GFLOP/s ({r['raysens']})")
    first = runs[variants[0]][0]
    out = {"model": name, "layers": first["layers"], "seq_len": args.seq_len, "samples": args.samples,
           "threads": first["threads"], "variants": {}}
    # one machine rate for every variant: the best 2048² matmul of the whole command (each child measured
    # its own; a per-variant rate made two equally fast variants read 0.65 and 0.70 — benchmarks.md)
    gf = max(r["matmul_gflops"] for rs in runs.values() for r in rs)
    first_best = min(r["s_per_sample"] for r in runs[variants[0]])
    for (tree, tok), rs in runs.items():
        best = min(rs, key=lambda r: r["s_per_sample"])
        rate = best["floor_gflop_per_sample"] / best["s_per_sample"]
        diff = max(rel_fro(np.array(best["mean_maps"][L]), np.array(first["mean_maps"][L])) for L in first["mean_maps"])
        out["variants"][f"{tree}:{tok}"] = {"s_per_sample": best["s_per_sample"],
                                            "all_s_per_sample": [r["s_per_sample"] for r in rs],
                                            "floor_gflops": rate, "matmul_gflops": gf, "fraction_of_matmul": rate / gf,
                                            "speedup_vs_first": first_best / best["s_per_sample"],
                                            "strategy": best["strategy"], "mean_map_rel_diff_vs_first": diff}
        log(f"{name} {tree} tokens={tok}: {best['s_per_sample']:.3f} s/sample ({first_best / best['s_per_sample']:.3f}× "
            f"the first variant), {rate:.1f} GFLOP/s of floor work = {rate / gf:.2f} of the matmul rate ({gf:.0f} "
            f"GFLOP/s, the best of the command); mean maps vs first variant {diff:.1e}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.forward_rate", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048], help="backward_tokens values to compare")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--baseline-tree", default=None, help="another checkout (e.g. of main) run alternately")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = {"models": [bench_model(m, args) for m in args.models]}
    if args.json:
        write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
