"""Samples a claim needs (issue 29; numpy only): the achieved relative standard error of each cell's
dataset mean, and how many samples would bring it to a target.

Per cell c with n_c ≥ 2 samples, a finite variance and a mean ≠ 0:

- relative SE     rel_c   = sqrt(var_c / n_c) / |mean_c|      (raw variance: data and probes)
- data part       data_c  = sqrt(var_corrected_c / n_c) / |mean_c|
- probe part      probe_c = sqrt(probe_noise_c / n_c) / |mean_c|   (unknown for hutchinson with K = 1)

A layer's figures are the median and the 90th percentile (``np.quantile``, linear) of these over its
cells. A run of N samples instead of n scales every n_c by N / n (the same mix of sample lengths), so
every rel_c by sqrt(n / N): the quantile q of the relative SE reaches ``target`` at

    n_needed = ceil(n · (rel_q / target)²)

samples, n the layer's sample count. ``n_needed_data`` is the same for the data part alone: what the
samples would need if the probe noise were removed (more probes per sample, or an exact estimator).
"""

from __future__ import annotations

import math

import numpy as np

from . import analysis as an

QUANTILES = (("median", 0.5), ("p90", 0.9))


def check_target(target: float, what: str = "raysens show: --target-se") -> float:
    """``target`` as a finite float > 0, else a one-line ValueError naming ``what``."""
    try:
        t = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number > 0, got {target!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"{what} must be > 0, got {target}")
    return t


def samples_needed(count: int, rel_se: float, target: float) -> float:
    """ceil(count · (rel_se / target)²); NaN when ``rel_se`` is NaN."""
    if not math.isfinite(rel_se):
        return math.nan
    return float(math.ceil(count * (rel_se / target) ** 2 - 1e-9))


def relative_errors(mean: np.ndarray, var: np.ndarray, var_corrected: np.ndarray, probe_noise: np.ndarray,
                    cell_count: np.ndarray, probe_known: bool = True) -> dict[str, float]:
    """``cells`` (how many cells count) and, for ``rel`` / ``data`` / ``probe``, the ``_median`` and
    ``_p90`` over cells of the relative SE (module docstring). Probe and data figures are NaN when
    ``probe_known`` is False (hutchinson with K = 1: ``analysis.probe_noise_known``)."""
    mean, var, vc, pn, n = (np.asarray(x, float) for x in (mean, var, var_corrected, probe_noise, cell_count))
    ok = np.isfinite(var) & (n >= 2) & np.isfinite(mean) & (mean != 0)
    out: dict[str, float] = {"cells": int(ok.sum())}
    parts = {"rel": var, "data": vc, "probe": pn}
    for part, v in parts.items():
        if part != "rel" and not probe_known or not ok.any():
            rel = None
        else:
            vv = np.where(np.isfinite(v[ok]), np.maximum(v[ok], 0.0), 0.0 if part == "probe" else np.nan)
            rel = np.sqrt(vv / n[ok]) / np.abs(mean[ok])
        for name, q in QUANTILES:
            out[f"{part}_{name}"] = float(np.nanquantile(rel, q)) if rel is not None and np.isfinite(rel).any() \
                else math.nan
    return out


def layer_precision(ls, target: float, probe_known: bool = True) -> dict[str, float]:
    """``relative_errors`` of one ``LayerStats`` plus, per quantile, ``n_needed_<q>`` (samples for the
    quantile to reach ``target``), ``n_needed_data_<q>`` (the same without probe noise) and
    ``meets_<q>`` (the run already has it); ``count`` is the layer's sample count."""
    target = check_target(target, "precision.layer_precision: target")
    out: dict = relative_errors(ls.mean, ls.var, ls.var_corrected, ls.probe_noise, ls.cell_count, probe_known)
    out["count"] = int(ls.count)
    out["target"] = target
    for name, _ in QUANTILES:
        out[f"n_needed_{name}"] = samples_needed(ls.count, out[f"rel_{name}"], target)
        out[f"n_needed_data_{name}"] = samples_needed(ls.count, out[f"data_{name}"], target)
        out[f"meets_{name}"] = bool(out[f"rel_{name}"] <= target) if math.isfinite(out[f"rel_{name}"]) else None
    return out


def run_precision(run, target: float) -> dict[int, dict]:
    """``{layer: layer_precision(...)}`` for a loaded run, each layer with its own probe-noise status
    (a planned run's layers have their own K)."""
    f = an.run_facts(run.manifest, run.layers)
    plans = an.layer_plans(run.manifest)
    return {L: layer_precision(ls, target, an.probe_noise_known(f, an.layer_probes(f, plans, L)))
            for L, ls in sorted(run.layers.items())}


def pct(x: float) -> str:
    return f"{an.fmt(x * 100, 2)}%" if x is not None and math.isfinite(x) else "unknown"


def needed(p: dict, name: str) -> str:
    """``met (20 ≥ 8)`` or ``42 (2.1× the 20 run)`` or ``–``."""
    n = p[f"n_needed_{name}"]
    if not math.isfinite(n):
        return "–"
    if p[f"meets_{name}"]:
        return f"{int(n):,} (met: the run has {p['count']:,})"
    return f"{int(n):,} ({an.fmt(n / max(p['count'], 1), 2)}× the run's {p['count']:,})"


def parts(p: dict, name: str) -> str:
    """``3.1% (data 2.9%, probe 1%)``."""
    return f"{pct(p[f'rel_{name}'])} (data {pct(p[f'data_{name}'])}, probe {pct(p[f'probe_{name}'])})"


HELP = ("relative SE of a cell's dataset mean, sqrt(var / n) / |mean| (data part from the corrected variance, "
        "probe part from the probe variance), median and 90th percentile over cells; samples needed = "
        "n · (relative SE / target)², the same mix of sample lengths assumed")


def format_target(run, target: float, layers=None) -> list[str]:
    """``raysens show --target-se`` lines: per layer the achieved median / p90 relative SE with their
    data and probe parts, and the samples each needs to reach ``target``."""
    target = check_target(target)
    lines = ["", f"samples a claim needs: target relative SE {an.fmt(target * 100, 3)}% per cell",
             f"  ({HELP})"]
    for L, p in run_precision(run, target).items():
        if layers and L not in layers:
            continue
        if not p["cells"]:
            lines.append(f"  layer {L}: no cell with n ≥ 2 and a nonzero mean")
            continue
        lines += [f"  layer {L} ({p['count']:,} samples, {p['cells']:,} cells)",
                  f"    median {parts(p, 'median')}: samples needed {needed(p, 'median')}",
                  f"    p90    {parts(p, 'p90')}: samples needed {needed(p, 'p90')}"]
        if math.isfinite(p["n_needed_data_median"]) and p["n_needed_data_median"] < p["n_needed_median"]:
            lines.append(f"    without probe noise (more probes per sample): {int(p['n_needed_data_median']):,} "
                         f"for the median, {int(p['n_needed_data_p90']):,} for p90")
    return lines
