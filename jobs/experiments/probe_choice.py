"""Which Hutchinson probe distribution? Error of ``hutchinson`` against ``exact`` on real MiniLM-L6.

Run by hand (about a minute on 2 CPU cores); the result is recorded in ``docs/benchmarks.md`` and
justifies the default ``probe_distribution`` of ``raysens.core.engine.SensitivityConfig``. From the
repository root::

    . .venv/bin/activate
    python -m jobs.experiments.probe_choice                 # 4 samples, S=12, last layer, 20 seeds
    python -m jobs.experiments.probe_choice --samples 4 --seq-len 12 --seeds 20 --json /tmp/probe_choice.json

For each probe law (rademacher, gaussian, sphere) and K ∈ {1, 4}: the relative Frobenius error
``‖Â − A‖_F / ‖A‖_F`` of each sample's ``[S, S]`` map, averaged over samples and over run seeds
(each seed draws fresh probes). ``A`` comes from the ``exact`` estimator (S·H VJPs). The seed
document's ``projection`` estimator (``u = 1/√H·1``, deterministic) is shown for comparison.

Why the laws differ: for one output position, ``‖vᵀJ_ij‖² = vᵀ M v`` with ``M = J_ij J_ijᵀ`` (H×H,
PSD). Its variance is ``2‖M‖_F² − 2Σ_a M_aa²`` for Rademacher, ``2‖M‖_F²`` for Gaussian, and
``2(H/(H+2))(‖M‖_F² − tr(M)²/H)`` for the sphere of radius √H, so Rademacher never loses to Gaussian;
the sphere wins when ``M`` is close to a multiple of the identity, Rademacher when ``M`` is dominated
by few coordinate directions.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from raysens.core.engine import SensitivityConfig, SensitivityEngine

from jobs.bench.common import SENTENCES as _ALL_SENTENCES
from jobs.bench.common import rel_fro_per_sample as rel_fro
from jobs.harness import log, write_json

SENTENCES = _ALL_SENTENCES[:6]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jobs.experiments.probe_choice", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--probes", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is more robust on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from raysens.core.models import load_model

    t0 = time.perf_counter()
    lm = load_model(args.model)
    tok = lm.tokenizer
    rows = []
    for s in SENTENCES[: args.samples]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        while len(ids) < args.seq_len:
            ids = ids + ids
        rows.append(ids[: args.seq_len])
    ids = torch.tensor(rows)
    sids = list(range(len(rows)))

    exact = SensitivityEngine(lm.model, SensitivityConfig(estimator="exact"))
    L = exact.resolve_layers(args.layer)[0]
    ref = exact.compute(ids, layers=L, sample_ids=sids).values[L]  # [samples, S, S]
    proj = SensitivityEngine(lm.model, SensitivityConfig(estimator="projection")).compute(
        ids, layers=L, sample_ids=sids).values[L]
    log(f"{args.model}: {len(rows)} samples, S={args.seq_len}, layer {L}, {args.seeds} seeds, "
          f"exact in {time.perf_counter() - t0:.1f} s")

    results = {"model": args.model, "samples": len(rows), "seq_len": args.seq_len, "layer": L,
               "seeds": args.seeds, "torch": torch.__version__,
               "projection_rel_err": float(rel_fro(proj, ref).mean()), "hutchinson": []}
    for k in args.probes:
        for dist in ("rademacher", "gaussian", "sphere"):
            errs = []
            for seed in range(args.seeds):
                eng = SensitivityEngine(lm.model, SensitivityConfig(
                    estimator="hutchinson", num_probes=k, probe_distribution=dist, seed=seed))
                est = eng.compute(ids, layers=L, sample_ids=sids).values[L]
                errs.append(rel_fro(est, ref))  # [samples]
            e = np.array(errs)  # [seeds, samples]
            # spread of the mean over seeds (standard error), per-sample means
            results["hutchinson"].append({
                "distribution": dist, "K": k, "mean_rel_err": float(e.mean()),
                "stderr": float(e.mean(1).std(ddof=1) / np.sqrt(len(e))),
                "per_sample": e.mean(0).tolist()})
            log(f"  K={k} {dist:10s}: mean rel. Frobenius error {e.mean():.4f}")

    log("\n" + "=" * 72)
    log(f"{'estimator':24s} {'K':>2s} {'rel. Frobenius error (mean ± s.e.)':>36s}")
    for r in results["hutchinson"]:
        log(f"{'hutchinson/' + r['distribution']:24s} {r['K']:2d} "
              f"{r['mean_rel_err']:28.4f} ± {r['stderr']:.4f}")
    log(f"{'projection (seed tool)':24s} {'-':>2s} {results['projection_rel_err']:28.4f}   (deterministic)")
    for k in args.probes:
        best = min((r for r in results["hutchinson"] if r["K"] == k), key=lambda r: r["mean_rel_err"])
        log(f"K={k}: lowest error: {best['distribution']}")
    results["wall_s"] = time.perf_counter() - t0
    log(f"wall time {results['wall_s']:.0f} s")
    write_json(results, args.json)


if __name__ == "__main__":
    main()
