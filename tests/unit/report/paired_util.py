"""Synthetic paired data for the report tests (issue 29): per-sample maps of two sides with common noise
and a known set of changed cells, and a numpy reference of the difference arrays (two-sided t-test by
the normal approximation, n large, and Benjamini–Hochberg written out)."""

from __future__ import annotations

import math

import numpy as np


def paired_samples(s: int = 20, n: int = 200, k_changed: int = 37, shift_se: float = 10.0, seed: int = 0,
                   causal: bool = False):
    """``(a, b, changed, sign)``: ``[n, s, s]`` maps with a shared per-sample factor (what common tokens
    and probes give) and a small independent part per side; ``k_changed`` cells of side a shifted by
    ``shift_se`` paired standard errors, up for the first ~80 % and down for the rest."""
    rng = np.random.default_rng(seed)
    i, j = np.indices((s, s))
    base = 1.0 + 0.5 * np.exp(-np.abs(i - j) / 3.0)
    common = base[None] * rng.lognormal(0.0, 0.3, (n, s, s))
    a = common + 0.02 * rng.standard_normal((n, s, s))
    b = common + 0.02 * rng.standard_normal((n, s, s))
    allowed = np.flatnonzero((j <= i).ravel() if causal else np.ones(s * s, bool))
    cells = rng.choice(allowed, k_changed, replace=False)
    changed = np.zeros(s * s, bool)
    changed[cells] = True
    changed = changed.reshape(s, s)
    sign = np.zeros((s, s))
    sign.ravel()[cells] = np.where(np.arange(k_changed) < int(0.8 * k_changed), 1.0, -1.0)
    se = np.sqrt((a - b).var(0, ddof=1) / n)
    a = a + (sign * shift_se * se)[None]
    if causal:
        a, b = (np.where((j <= i)[None], x, 0.0) for x in (a, b))
    return a, b, changed, sign


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values over the finite entries (plain loop reference)."""
    flat = p.ravel()
    idx = [k for k in range(flat.size) if math.isfinite(flat[k])]
    idx.sort(key=lambda k: flat[k])
    m = len(idx)
    q = np.full(flat.size, np.nan)
    run = 1.0
    for rank in range(m, 0, -1):
        k = idx[rank - 1]
        run = min(run, flat[k] * m / rank)
        q[k] = min(run, 1.0)
    return q.reshape(p.shape)


def reference_differences(a: np.ndarray, b: np.ndarray, fdr: float = 0.05) -> dict:
    """The difference arrays a paired run stores, from the per-sample maps (numpy, float64)."""
    d = a - b
    n = a.shape[0]
    mean = d.mean(0)
    var = d.var(0, ddof=1)
    se = np.sqrt(var / n)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = mean / se
        p = np.where(se > 0, np.vectorize(lambda x: math.erfc(abs(x) / math.sqrt(2)))(np.nan_to_num(t)), np.nan)
        lr = np.where((a > 0) & (b > 0), np.log(np.where(a > 0, a, 1)) - np.log(np.where(b > 0, b, 1)), np.nan)
    q = bh(p)
    n_log = np.isfinite(lr).sum(0)
    with np.errstate(invalid="ignore"):
        mlr = np.where(n_log > 0, np.nansum(lr, 0) / np.maximum(n_log, 1), np.nan)
    return {"n_pairs": np.full(mean.shape, n), "mean_diff": mean, "var_diff": var, "se_diff": se, "t": t, "p": p,
            "q": q, "significant": q <= fdr, "n_log": n_log, "mean_log_ratio": mlr,
            "se_log_ratio": np.full(mean.shape, np.nan),
            "se_unpaired": np.sqrt(a.var(0, ddof=1) / n + b.var(0, ddof=1) / n),
            "fdr": np.asarray(fdr), "count": np.asarray(n)}


def power_maps(p: float, n: int = 200, s: int = 32, common=None, seed: int = 0, gamma: float = 0.01,
               beta: float = 1.0) -> np.ndarray:
    """Causal ``[n, s, s]`` maps with E[A_ij] = γ + β (i − j + 1)^(−p) below the diagonal (mean-one
    lognormal factors; ``common``: the same factors on both sides, as a paired run's samples share)."""
    rng = np.random.default_rng(seed)
    i, j = np.indices((s, s))
    law = np.where(j <= i, gamma + beta * np.maximum(i - j + 1.0, 1.0) ** (-p), 0.0)
    f = common if common is not None else rng.lognormal(0.0, 0.5, (n, s, s))
    return law[None] * f / np.exp(0.5 ** 2 / 2)


class Side:
    """What ``decay.layer_fit`` reads of a side's ``LayerStats``, from per-sample maps."""

    def __init__(self, x: np.ndarray):
        self.mean = x.mean(0)
        self.var = x.var(0, ddof=1)
        self.cell_count = np.full(self.mean.shape, x.shape[0])


LABELS = ["toy", "toy, layers.1.mlp × 1.01"]


def make_paired_run(path, s: int = 16, n: int = 160, fdr: float = 0.05) -> dict:
    """A paired run directory written by the store's own writer (``results.write_manifest`` +
    ``paired_results.write_paired_layer`` on ``PairedCells`` folded from synthetic maps): layer 1 with
    37 cells shifted by 10 paired SEs (causal map, no power law), layer 3 with a decay law of exponent
    0.8 on side a and 0.5 on side b (shared per-sample factors). Returns ``{layer: (a, b)}``."""
    from raysens.stats.paired import PairedCells
    from raysens.store import paired_results
    from raysens.store.results import write_manifest

    a1, b1, changed, _ = paired_samples(s=s, n=n, k_changed=37, causal=True, seed=1)
    rng = np.random.default_rng(3)
    common = rng.lognormal(0.0, 0.5, (n, s, s))
    a3 = power_maps(0.8, n=n, s=s, common=common * rng.lognormal(0.0, 0.2, common.shape))
    b3 = power_maps(0.5, n=n, s=s, common=common * rng.lognormal(0.0, 0.2, common.shape))
    maps = {1: (a1, b1), 3: (a3, b3)}
    ids = np.arange(n)
    for L, (a, b) in maps.items():
        st = PairedCells.empty(s)
        for k in range(0, n, 40):  # folded in batches, as a run does
            st.update(a[k:k + 40], b[k:k + 40], None, sample_ids=ids[k:k + 40])
        paired_results.write_paired_layer(str(path), L, st, fdr)
    layers = sorted(maps)
    write_manifest(str(path), {
        "config": {"model": {"name": "toy"}, "data": {"source": "bundled", "max_seq_len": s},
                   "sensitivity": {"estimator": "exact"}, "layers": layers},
        "model": {"name": "toy", "class": "LlamaModel", "model_type": "llama", "num_hidden_layers": 4,
                  "hidden_size": 32, "parameters": 1000},
        "estimator": "exact", "seed": 0, "layers": layers, "max_seq_len": s,
        "samples": {"total": n, "computed": n, "skipped": 0},
        "paired": {"a": {"name": "toy"}, "b": {"name": "toy", "scale": {"module": "layers.1.mlp", "factor": 1.01}},
                   "labels": LABELS, "layer_map": {}, "fdr": fdr,
                   "stats_b": {str(L): paired_results.b_file(L) for L in layers},
                   "stats_diff": {str(L): paired_results.diff_file(L) for L in layers}},
    })
    return {L: (*maps[L], changed if L == 1 else None) for L in layers}
