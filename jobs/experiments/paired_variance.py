"""Issue 29: how much does pairing shrink the standard error of a per-cell difference? Core path only (no Ray).

Run by hand (minutes on 2 CPU cores); the table is recorded in ``docs/benchmarks.md`` ("Issue 29 —
paired vs unpaired standard errors"). From the repository root::

    . .venv/bin/activate
    python -m jobs.experiments.paired_variance --pair minilm-random --samples 64
    python -m jobs.experiments.paired_variance --pair smollm2-mlp --samples 24 --layers 8 16 23 30
    python -m jobs.experiments.paired_variance --pair minilm-random --samples 64 --json /tmp/pv.json

Pairs: ``smollm2-mlp`` — SmolLM2 (side a) against a deep copy whose block ``--block`` (default the
middle one) has its MLP parameters multiplied by ``--factor`` (1.01); ``minilm-random`` — MiniLM against
its random initialisation (the same config, ``torch.manual_seed(0)``, ``AutoModel.from_config``).

Both sides are computed on the same ``n`` samples of the bundled corpus (the first ``n`` rows with at
least ``S`` tokens, cut to ``S`` = 32 tokens: no padding), with the default estimator (Hutchinson,
K = 1, Rademacher) and the same seed, so the same probes (common random numbers), and folded into a
``raysens.stats.paired.PairedCells``. For the unpaired comparison at equal cost, side b is computed
again on the ``n`` *next* rows with another seed (an independent run). Per layer, over the cells where
the unpaired SE is > 0 (the causal half for SmolLM2), the medians of:

- ``se_paired``: the paired SE of the mean difference (``DiffStats``);
- ``se_unpaired``: ``sqrt(var_a/n + var_b/n)`` from the paired run's two sides (the formula);
- ``se_unpaired_indep``: the same with side b's variance from the independent run (realised);
- ``ratio``: median over cells of ``se_unpaired / se_paired`` (> 1: pairing helps) and ``factor`` =
  ratio²: how many times more samples two independent runs need for the paired SE;
- cells significant at FDR 5 % (Benjamini–Hochberg): paired t test, and the unpaired Welch test of
  ``mean_a − mean_b'`` (side a from the paired run, b' from the independent run);
- ``corr``: the median per-cell correlation of the two sides over samples (what pairing exploits:
  ``var(D) = var_a + var_b − 2ρ·sd_a·sd_b``), ``scale_b_over_a``: median of ``mean_b / mean_a``;
- ``calib_rms_z``: RMS over cells of ``(mean_b − mean_b') / sqrt(var_b/n + var_b'/n)`` — about 1
  when the variance estimates are honest (two independent estimates of the same mean).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from jobs.harness import log, write_json

PAIRS = ("smollm2-mlp", "minilm-random")


def corpus_rows(tokenizer, n_rows: int, seq_len: int) -> list[list[int]]:
    """The first ``n_rows`` rows of the bundled corpus with at least ``seq_len`` tokens, cut to ``seq_len``
    (the run's tokenization: special tokens added)."""
    from raysens.corpus.reader import BUNDLED

    rows = []
    for line in Path(BUNDLED).read_text().splitlines():
        text = json.loads(line).get("text")
        if not isinstance(text, str) or not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) == seq_len:
            rows.append(ids)
            if len(rows) == n_rows:
                return rows
    raise SystemExit(f"the bundled corpus has only {len(rows)} rows of >= {seq_len} tokens, {n_rows} needed")


def side_b(pair: str, model, block: int | None, factor: float):
    """Side b's model (a new module; side a's is left as it is) and a description."""
    from raysens.core.models.hub import prepare_for_analysis

    if pair == "smollm2-mlp":
        nb = model.config.num_hidden_layers
        k = nb // 2 if block is None else block
        b = copy.deepcopy(model)
        with torch.no_grad():
            for p in b.layers[k].mlp.parameters():
                p.mul_(factor)
        return b, {"change": f"layers.{k}.mlp parameters x {factor}", "block": k, "factor": factor}
    from transformers import AutoModel

    torch.manual_seed(0)
    b = AutoModel.from_config(copy.deepcopy(model.config))
    return prepare_for_analysis(b), {"change": "random initialisation of the same config (torch.manual_seed(0))"}


def compute(engine, rows, ids, layers, batch):
    """Per layer, float64 ``[n, S, S]`` maps of ``rows`` (sample_ids ``ids``), in batches."""
    out = {L: [] for L in layers}
    for i in range(0, len(rows), batch):
        res = engine.compute(torch.tensor(rows[i:i + batch]), layers=list(layers), sample_ids=ids[i:i + batch])
        for L in layers:
            out[L].append(np.asarray(res.values[L], np.float64))
        log(f"    {min(i + batch, len(rows))}/{len(rows)} samples")
    return {L: np.concatenate(v) for L, v in out.items()}


def layer_row(L: int, st, b_indep, fdr: float) -> dict:
    """The table row of one layer: ``st`` the paired state, ``b_indep`` side b's CellStats of the independent run."""
    from raysens.stats.paired import bh_qvalues, two_sided_t_p

    d = st.differences(fdr)
    sa, sb, sb2 = st.a.statistics(), st.b.statistics(), b_indep.statistics()
    n = st.count.astype(np.float64)
    n2 = b_indep.count.astype(np.float64)
    va, vb, vb2 = sa["var"] / n, sb["var"] / n, sb2["var"] / n2
    se_p, se_u = d["se_diff"], d["se_unpaired"]
    se_r = np.sqrt(va + vb2)
    cells = np.isfinite(se_u) & (se_u > 0)
    identical = bool(cells.any() and (se_p[cells] == 0).all() and (d["mean_diff"][cells] == 0).all())
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = se_u / se_p
        # unpaired Welch test: mean_a − mean_b', Welch–Satterthwaite degrees of freedom
        diff_u = sa["mean"] - sb2["mean"]
        dof = (va + vb2) ** 2 / (va ** 2 / (n - 1) + vb2 ** 2 / (n2 - 1))
        p_u = two_sided_t_p(np.where(cells, diff_u / se_r, np.nan), np.where(cells, dof, np.nan))
        z = (sb["mean"] - sb2["mean"]) / np.sqrt(vb + vb2)
        # the per-cell correlation of the two sides over samples: var(D) = var_a + var_b − 2ρ·sd_a·sd_b
        corr = (sa["var"] + sb["var"] - d["var_diff"]) / (2 * np.sqrt(sa["var"] * sb["var"]))
        scale = sb["mean"] / sa["mean"]
    q_u = bh_qvalues(p_u)
    med = lambda a: float(np.median(a[cells])) if cells.any() else float("nan")  # noqa: E731
    return {"layer": L, "cells": int(cells.sum()), "n": int(st.samples),
            "se_paired": med(se_p), "se_unpaired": med(se_u), "se_unpaired_indep": med(se_r),
            "ratio": float("inf") if identical else med(ratio),
            "ratio_of_medians": float("inf") if identical else med(se_u) / med(se_p),
            "factor": float("inf") if identical else med(ratio) ** 2,
            "sig_paired": int(d["significant"][cells].sum()), "sig_unpaired": int((np.nan_to_num(q_u, nan=2) <= fdr)[cells].sum()),
            "mean_abs_rel_diff": med(np.abs(d["mean_diff"]) / np.maximum(sa["mean"], 1e-300)),
            "calib_rms_z": float(np.sqrt(np.mean(z[cells] ** 2))) if cells.any() else float("nan"),
            "corr": med(corr), "scale_b_over_a": med(scale),
            "identical_sides": identical}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jobs.experiments.paired_variance", description=__doc__.split("\n")[0])
    ap.add_argument("--pair", choices=PAIRS, required=True)
    ap.add_argument("--samples", type=int, default=None, help="n (default: 64 for minilm-random, 24 for smollm2-mlp)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help="hidden_states indices (default: every layer for MiniLM, 8 16 23 30 for SmolLM2)")
    ap.add_argument("--block", type=int, default=None, help="smollm2-mlp: the block whose MLP is scaled (default: middle)")
    ap.add_argument("--factor", type=float, default=1.01)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fdr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from raysens.core.engine import SensitivityConfig, SensitivityEngine
    from raysens.core.models import load_model
    from raysens.stats.cells import CellStats
    from raysens.stats.paired import PairedCells

    t0 = time.perf_counter()
    name = "smollm2" if args.pair == "smollm2-mlp" else "minilm"
    lm = load_model(name)
    model_b, change = side_b(args.pair, lm.model, args.block, args.factor)
    n = args.samples or (24 if name == "smollm2" else 64)
    layers = args.layers or ([8, 16, 23, 30] if name == "smollm2" else list(range(1, 7)))
    rows = corpus_rows(lm.tokenizer, 2 * n, args.seq_len)
    ids, ids2 = list(range(n)), list(range(n, 2 * n))
    cfg = SensitivityConfig(seed=args.seed)
    eng_a, eng_b = SensitivityEngine(lm.model, cfg), SensitivityEngine(model_b, cfg)
    eng_b2 = SensitivityEngine(model_b, SensitivityConfig(seed=args.seed + 1))
    log(f"{args.pair}: n={n}, S={args.seq_len}, layers {layers}; side b: {change['change']} "
        f"(loaded in {time.perf_counter() - t0:.1f} s)")
    timing = {}
    t = time.perf_counter()
    va = compute(eng_a, rows[:n], ids, layers, args.batch)
    timing["a"] = time.perf_counter() - t
    t = time.perf_counter()
    vb = compute(eng_b, rows[:n], ids, layers, args.batch)
    timing["b"] = time.perf_counter() - t
    t = time.perf_counter()
    vb2 = compute(eng_b2, rows[n:], ids2, layers, args.batch)
    timing["b_indep"] = time.perf_counter() - t
    log(f"computed in {timing['a']:.0f} + {timing['b']:.0f} + {timing['b_indep']:.0f} s "
        f"(modes {eng_a._mode_used}, {eng_b._mode_used}, {eng_b2._mode_used})")
    table = []
    for L in layers:
        st = PairedCells.from_batch(va[L], vb[L], sample_ids=ids)
        row = layer_row(L, st, CellStats.from_batch(vb2[L], sample_ids=ids2), args.fdr)
        table.append(row)
        log(f"  layer {L:2d}: se_paired {row['se_paired']:.3g}  se_unpaired {row['se_unpaired']:.3g} "
            f"(indep {row['se_unpaired_indep']:.3g})  ratio {row['ratio']:.2f}  factor {row['factor']:.1f}  "
            f"sig {row['sig_paired']}/{row['sig_unpaired']} of {row['cells']}  corr {row['corr']:.2f}  "
            f"b/a {row['scale_b_over_a']:.3g}  calib z {row['calib_rms_z']:.2f}")
    res = {"pair": args.pair, "model": name, "side_b": change, "n": n, "seq_len": args.seq_len, "layers": layers,
           "estimator": "hutchinson K=1 rademacher (default)", "seed": args.seed, "fdr": args.fdr,
           "threads": args.threads, "torch": torch.__version__, "compute_s": timing,
           "mode": str(getattr(eng_a, "_mode_used", None)), "table": table}
    write_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
