"""Accuracy-aware planning (docs/DESIGN.md §1.11): cost against worst-layer error for all-forward,
all-reverse and planned runs, exact maps as the reference, in one process.

    python -m jobs.experiments.planner [--model smollm2] [--layers 1 4 8 12 15] [--samples 8] [--seq-len 16]
                                 [--seeds 3] [--fwd-k 1 2 4 8 16] [--rev-k 1 2 4] [--budgets 1 1.5 2 3 4 6]
                                 [--threads 2] [--device cpu|cuda] [--json PATH]

For each run seed, every configuration computes the same ``--samples`` samples; the error of a layer
is the median over cells of |mean − exact mean| / exact mean, where both means are over those
samples (so only probe noise is measured: the planner is asked for ``target_error: probe``). The
worst layer's error is averaged over the seeds. Cost: the deterministic cost model per sample
(``schedule.mode_costs``, the planner's own measure, as a multiple of a mode-auto K=1 run) and the
measured seconds per sample. A planned run first runs the pilot (``core.planning.pilot.run_pilot``: the first
``--pilot`` samples with K=2 in both modes; its cost is listed separately, one-off per run). The
exact maps (forward exact, S·D tangents per sample) are cached in ``--cache``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from jobs.bench.common import make_inputs
from jobs.harness import log, write_json


def _err(mean: np.ndarray, ref: np.ndarray) -> float:
    ok = np.isfinite(ref) & (ref > 1e-12 * np.nanmax(ref))
    return float(np.median(np.abs(mean[ok] - ref[ok]) / ref[ok]))


def _means(res, layers):
    return {L: res.values[L].mean(axis=0) for L in layers}


def main(argv=None):
    from raysens.core.engine import SensitivityConfig, SensitivityEngine
    from raysens.core.models import load_model
    from raysens.core.planning.pilot import PilotSamples, run_pilot
    from raysens.core.planning.planned import PlannedEngine
    from raysens.core.planning.planner import plan_cost, unit_costs

    ap = argparse.ArgumentParser(prog="python -m jobs.experiments.planner", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 4, 8, 12, 15])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pilot", type=int, default=None, help="pilot samples (default: SensitivityConfig.pilot_samples)")
    ap.add_argument("--fwd-k", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rev-k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--budgets", type=float, nargs="+", default=[1, 1.5, 2, 3, 4, 6])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the exact maps take S·D tangents per sample)")
    ap.add_argument("--cache", default="/tmp/raysens_planner_exact")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.pilot = args.pilot or SensitivityConfig().pilot_samples
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device)
    layers, n, seq = sorted(args.layers), args.samples, args.seq_len
    ids, am = make_inputs(lm.tokenizer, n, seq)
    sids = list(range(n))
    cache = Path(f"{args.cache}_{args.model}_S{seq}_n{n}_{'-'.join(map(str, layers))}.npz")
    if cache.exists():
        exact = {int(k[1:]): v for k, v in np.load(cache).items()}
        log(f"exact maps from {cache}")
    else:
        t0 = time.perf_counter()
        r = SensitivityEngine(lm.model, SensitivityConfig(estimator="exact", mode="forward"), device=args.device).compute(
            ids, am, layers=layers, sample_ids=sids)
        exact = _means(r, layers)
        np.savez(cache, **{f"L{L}": v for L, v in exact.items()})
        log(f"exact maps: {time.perf_counter() - t0:.1f} s for {n} samples -> {cache}")

    engines: dict = {}

    def engine(cfg: SensitivityConfig):
        key = repr(cfg)
        if key not in engines:
            engines[key] = (PlannedEngine if cfg.layer_plan else SensitivityEngine)(lm.model, cfg, device=args.device)
        return engines[key]

    probe_eng = SensitivityEngine(lm.model, SensitivityConfig(mode="reverse"), device=args.device)
    rev1, fwd1 = unit_costs(layers, seq=seq, causal=probe_eng.causal, manual_reverse=True, manual_forward=True)
    ref = min(sum(rev1.values()), fwd1[max(layers)])

    def measure(name, cfg_for_seed, cost):
        errs, secs, worst = {L: [] for L in layers}, [], []
        for seed in range(args.seeds):
            cfg = cfg_for_seed(seed)
            eng = engine(cfg)
            t0 = time.perf_counter()
            r = eng.compute(ids, am, layers=layers, sample_ids=sids, max_seq_len=seq)
            secs.append((time.perf_counter() - t0) / n)
            e = {L: _err(m, exact[L]) for L, m in _means(r, layers).items()}
            for L in layers:
                errs[L].append(e[L])
            worst.append(max(e.values()))
        row = {"name": name, "cost": cost / ref, "s_per_sample": float(np.median(secs)),
               "worst_err": float(np.mean(worst)), "err_by_layer": {str(L): float(np.mean(v)) for L, v in errs.items()}}
        log(f"{name:>28s}: cost {row['cost']:6.2f}x  {row['s_per_sample']:.3f} s/sample  worst err "
            f"{row['worst_err']:.4f}  {row['err_by_layer']}")
        return row

    rows = []
    for k in args.fwd_k:
        rows.append(measure(f"forward K={k}", lambda s, k=k: SensitivityConfig(mode="forward", num_probes=k, seed=s),
                            plan_cost({L: ("forward", k) for L in layers}, rev1, fwd1)))
    for k in args.rev_k:
        rows.append(measure(f"reverse K={k}", lambda s, k=k: SensitivityConfig(mode="reverse", num_probes=k, seed=s),
                            plan_cost({L: ("reverse", k) for L in layers}, rev1, fwd1)))
    plans = []
    for b in args.budgets:
        per_seed = {}
        for seed in range(args.seeds):
            cfg = SensitivityConfig(budget=b, target_error="probe", seed=seed, pilot_samples=args.pilot)
            t0 = time.perf_counter()
            plan = run_pilot(lm.model, cfg, PilotSamples([list(map(int, x)) for x in ids[:args.pilot]], sids[:args.pilot],
                                                         seq), layers, n=n, device=args.device)
            plan["pilot"]["wall_s"] = time.perf_counter() - t0
            per_seed[seed] = plan
        plans.append({"budget": b, "plans": {s: {"layer_plan": p["layer_plan"], "cost": p["cost"]["relative_to_auto_k1"],
                                                 "worst_predicted": p["worst_predicted"], "pilot_s": p["pilot"]["wall_s"]}
                                             for s, p in per_seed.items()}})
        cost = float(np.mean([p["cost"]["per_sample"] for p in per_seed.values()]))
        row = measure(f"planned budget {b:g}x", lambda s: SensitivityConfig(
            layer_plan=tuple(per_seed[s]["layer_plan"]), seed=s), cost)
        row["layer_plans"] = {s: p["layer_plan"] for s, p in per_seed.items()}
        row["predicted_worst_probe_rel_se"] = float(np.mean([p["worst_predicted"] for p in per_seed.values()]))
        row["pilot_s"] = float(np.mean([p["pilot"]["wall_s"] for p in per_seed.values()]))
        log(f"{'':>28s}  plans {row['layer_plans']}  predicted worst probe rel SE "
            f"{row['predicted_worst_probe_rel_se']:.4f}  pilot {row['pilot_s']:.1f} s")
        rows.append(row)
    for row in rows:
        if row["name"].startswith("planned"):
            row["vs_curves"] = _vs_curves(row, rows)
    log(table(rows, layers))
    res = {"model": args.model, "device": args.device, "layers": layers, "samples": n, "seq_len": seq, "seeds": args.seeds,
           "pilot_samples": args.pilot, "torch_threads": torch.get_num_threads(),
           "cost_unit": "cost model per sample / cost of a mode-auto K=1 run", "auto_k1_cost": ref,
           "rows": rows, "plans": plans}
    if args.json:
        write_json(res, args.json)
    return res


def _vs_curves(row: dict, rows: list[dict]) -> dict:
    """For a planned row and each pure curve (all-forward, all-reverse): the best worst-layer error of
    that curve's runs costing at most as much, and whether the planned run is on or below it."""
    out = {}
    for curve in ("forward", "reverse"):
        errs = [r["worst_err"] for r in rows if r["name"].startswith(curve) and r["cost"] <= row["cost"] * (1 + 1e-9)]
        best = min(errs) if errs else None
        out[curve] = {"best_at_cost": best, "on_or_below": best is None or row["worst_err"] <= best}
    return out


def table(rows: list[dict], layers) -> str:
    """The rows as a Markdown table (cost, s/sample, worst-layer error, per-layer errors, plan)."""
    head = ["run", "cost (x auto K=1)", "s/sample", "worst-layer error"] + [f"L{L}" for L in layers] + ["plan (seed 0)", "on/below fwd, rev"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vs = r.get("vs_curves")
        plan = " ".join((r.get("layer_plans") or {}).get(0, [])) or "–"
        out.append("| " + " | ".join([r["name"], f"{r['cost']:.2f}", f"{r['s_per_sample']:.3f}", f"{r['worst_err']:.4f}"]
                                     + [f"{r['err_by_layer'][str(L)]:.4f}" for L in layers] + [plan]
                                     + [", ".join("yes" if vs[c]["on_or_below"] else "NO" for c in ("forward", "reverse"))
                                        if vs else "–"]) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
