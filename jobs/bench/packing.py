"""Packed causal tangent rows against suffix segments (issue 30): forward mode, every layer, K=1, S=32.

    python -m jobs.bench.packing                                       # SmolLM2 + MiniLM, 8 samples, 5 rounds
    python -m jobs.bench.packing --models smollm2 --rounds 5 --json jobs/results/i30_packing.json
    python -m jobs.bench.packing --models smollm2 --before /tmp/before  # + the tree before, in its own process

One child process per model (``jobs.harness.run_child``). In it one engine runs packed
(``stacks/packing.py``, the default) and one runs the suffix segments (``ManualForward.packing =
False``: the pre-packing schedule of ``dp_segments``, same formulas), alternating per round with a
2048² fp32 ``torch.matmul`` between them (the machine's rate in the same process). Printed per
variant: median and range of s/sample, the FLOP floor's rate (``block_params · S(S+1)``, as in
``forward_rate.py``) as a fraction of the median matmul rate, the paired per-round speed-up and the
K=1 mean maps' distance. ``--before TREE``: a checkout of the tree before packing (``git worktree add
/tmp/before 38ed644``) runs the same child in its own process, alternating with this tree's child
``--outer`` times (each process's fraction of its own matmul rate is what compares). MiniLM (BERT) is
not causal: one segment either way, its figures are the fraction the issue asks to report. No Ray.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from jobs.bench.common import alternate_rounds, forward_child, forward_floor, rel_fro
from jobs.harness import log, run_child, write_json


def child(spec: dict) -> dict:
    """One model: the ``spec["variants"]`` (``packed``, ``segments``) alternating in this process."""
    from raysens.core.engine import SensitivityConfig, SensitivityEngine

    lm, layers, ids, am = forward_child(spec)
    n = layers[-1]
    engines = {}
    for name in spec["variants"]:
        e = SensitivityEngine(lm.model, SensitivityConfig(num_probes=1, mode="forward"))
        if name == "segments":
            e._manual_fwd.packing = False
        e.compute(ids[:2], am[:2], layers=layers)  # warm-up
        engines[name] = e
    eng0 = next(iter(engines.values()))
    floor = forward_floor(eng0, spec["seq_len"])
    times, mm, maps = alternate_rounds(engines, ids, am, layers, spec["rounds"])
    names = list(engines)
    diff = (max(rel_fro(maps[names[0]][L], maps[names[1]][L]) for L in layers[1:]) if len(names) > 1 else None)
    return {"model": spec["model"], "layers": n, "threads": torch.get_num_threads(), "causal": bool(eng0.causal),
            "floor_gflop_per_sample": floor / 1e9, "s_per_sample": times, "matmul_gflops": mm, "mean_map_rel_diff": diff,
            "packed_path": bool(getattr(eng0._manual_fwd, "packed", False)) if eng0._manual_fwd is not None else False}


def summarize(r: dict) -> dict:
    """Median s/sample, range and fraction of the median matmul rate per variant; paired speed-up."""
    gf = statistics.median(r["matmul_gflops"])
    out = {"matmul_gflops_median": gf, "matmul_gflops_range": [min(r["matmul_gflops"]), max(r["matmul_gflops"])]}
    for name, ts in r["s_per_sample"].items():
        med = statistics.median(ts)
        out[name] = {"s_per_sample_median": med, "range": [min(ts), max(ts)], "floor_gflops": r["floor_gflop_per_sample"] / med,
                     "fraction_of_matmul": r["floor_gflop_per_sample"] / med / gf,
                     "fraction_per_round": [r["floor_gflop_per_sample"] / t / m for t, m in zip(ts, r["matmul_gflops"])]}
    if "segments" in r["s_per_sample"] and "packed" in r["s_per_sample"]:
        pairs = [s / p for s, p in zip(r["s_per_sample"]["segments"], r["s_per_sample"]["packed"])]
        out["speedup_per_round"] = pairs
        out["speedup_median"] = statistics.median(pairs)
    return out


def _line(name: str, v: dict) -> str:
    return (f"  {name:9s}: {v['s_per_sample_median']:.3f} s/sample [{v['range'][0]:.3f}, {v['range'][1]:.3f}], "
            f"{v['floor_gflops']:.1f} GFLOP/s = {v['fraction_of_matmul']:.2f} of the matmul rate")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.packing", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before", default=None, help="a checkout of the tree before packing: its own child process")
    ap.add_argument("--outer", type=int, default=2, help="with --before: child pairs (before, this tree) alternating")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = {"models": []}
    for m in args.models:
        spec = {"model": m, "samples": args.samples, "seq_len": args.seq_len, "rounds": args.rounds,
                "threads": args.threads, "variants": ["packed", "segments"]}
        entry = {"model": m}
        if args.before:
            one = dict(spec, variants=["packed"])  # the tree before has no packing: its default path
            entry["processes"] = []
            for _ in range(args.outer):
                for label, tree in (("before", args.before), ("this tree", None)):
                    r = run_child("jobs.bench.packing:child", one, tree=tree)
                    s = summarize(r)
                    entry["processes"].append({"tree": label, "raw": r, "summary": s})
                    log(f"{m} [{label}, own process, packed path {r['packed_path']}]: "
                        f"{s['packed']['s_per_sample_median']:.3f} s/sample = {s['packed']['fraction_of_matmul']:.2f} "
                        f"of the matmul rate ({s['matmul_gflops_median']:.0f} GFLOP/s)")
        r = run_child("jobs.bench.packing:child", spec)
        s = summarize(r)
        entry.update(raw=r, summary=s)
        res["models"].append(entry)
        log(f"{m} ({r['layers']} layers, {'causal' if r['causal'] else 'not causal'}, S={args.seq_len}, K=1, "
            f"{r['threads']} threads, {args.rounds} rounds): matmul 2048² median {s['matmul_gflops_median']:.0f} GFLOP/s "
            f"[{s['matmul_gflops_range'][0]:.0f}, {s['matmul_gflops_range'][1]:.0f}]")
        for name in ("packed", "segments"):
            log(_line(name, s[name]))
        log(f"  segments/packed per round {[round(x, 3) for x in s['speedup_per_round']]}, median "
            f"{s['speedup_median']:.3f}×; mean maps packed vs segments {r['mean_map_rel_diff']:.1e}")
    write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
