"""Numeric summaries of sensitivity maps for plots, reports and the terminal (numpy only).

All inputs are ``[pos_out, pos_in]`` arrays as stored in a run directory: ``mean`` (NaN where no
sample reached the cell), ``std``/``var`` (NaN where n < 2) and ``cell_count``. Nothing here imports
matplotlib, Ray or torch.

Why this module is long: a set of small, independent numpy summaries that plots, the report and
``show`` read from the same run-directory arrays.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np


def is_causal(mean: np.ndarray) -> bool:
    """True when every finite cell above the diagonal is exactly 0 (a causal model's A_ij, j > i)."""
    up = mean[np.triu_indices(mean.shape[0], k=1)]
    up = up[np.isfinite(up)]
    return up.size > 0 and bool((up == 0).all())


def _rows(mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row sums Σ_j A_ij over finite cells, and which rows have a positive sum."""
    total = np.nansum(np.where(np.isfinite(mean), mean, np.nan), axis=1)
    return total, total > 0


def distance_profile(mean: np.ndarray, var: np.ndarray | None = None, cell_count: np.ndarray | None = None,
                     causal_only: bool = False, skip_first: bool = False) -> dict[str, np.ndarray]:
    """Sensitivity against distance d = i − j (only d ≥ 0 when ``causal_only``; without the first
    input column j = 0 when ``skip_first``).

    Returns ``d`` (distances that have at least one finite cell), ``mean`` (average of E[A_ij] over
    the cells at distance d), ``sd`` (root of the average per-cell variance: the typical spread over
    samples) and ``se`` (root of the average ``var / n``: the typical standard error of a cell's
    dataset mean), ``cells`` (number of cells averaged).
    """
    s = mean.shape[0]
    ii, jj = np.indices(mean.shape)
    dist = (ii - jj).ravel()
    m = np.where(jj == 0, np.nan, mean).ravel() if skip_first else mean.ravel()
    v = np.full_like(m, np.nan) if var is None else var.ravel()
    n = np.ones_like(m) if cell_count is None else cell_count.ravel().astype(float)
    out: dict[str, list] = {"d": [], "mean": [], "sd": [], "se": [], "cells": []}
    for d in range(0 if causal_only else -(s - 1), s):
        sel = (dist == d) & np.isfinite(m)
        if not sel.any():
            continue
        vv = v[sel]
        ok = np.isfinite(vv) & (n[sel] > 0)
        out["d"].append(d)
        out["mean"].append(float(m[sel].mean()))
        out["sd"].append(float(np.sqrt(vv[ok].mean())) if ok.any() else np.nan)
        out["se"].append(float(np.sqrt((vv[ok] / n[sel][ok]).mean())) if ok.any() else np.nan)
        out["cells"].append(int(sel.sum()))
    return {k: np.asarray(v_, dtype=float if k != "d" and k != "cells" else int) for k, v_ in out.items()}


def layer_summary(mean: np.ndarray) -> dict[str, float]:
    """Scalar summaries of one layer's mean map.

    Averages run over output rows i ≥ 1 for causal models (row 0 sees only its own token, and its
    A_00 is often orders of magnitude off the rest) and over all rows otherwise.

    - ``diag``: mean of E[A_ii]; ``offdiag``: mean over off-diagonal cells the model can see
      (j < i for causal models, all j ≠ i otherwise).
    - ``diag_share`` / ``sink_share``: average of A_ii / Σ_j A_ij and A_i0 / Σ_j A_ij.
    - ``distance``: average of the sensitivity-weighted mean |i − j| of each row.
    - ``row_total``: average row sum Σ_j A_ij (total sensitivity of an output position).
    """
    s = mean.shape[0]
    causal = is_causal(mean)
    ii, jj = np.indices(mean.shape)
    fin = np.isfinite(mean)
    off_sel = fin & ((jj < ii) if causal else (jj != ii))
    total, pos = _rows(mean)
    rows = pos & (np.arange(s) >= (1 if causal and s > 1 else 0))
    a = np.where(fin, mean, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        diag_share = np.diag(a) / total
        sink_share = a[:, 0] / total
        wdist = (np.abs(ii - jj) * a).sum(axis=1) / total

    def avg(x: np.ndarray) -> float:
        x = x[rows]
        return float(x.mean()) if x.size else math.nan

    dg = np.diag(mean)[(np.arange(s) >= (1 if causal and s > 1 else 0))]
    return {
        "diag": float(np.nanmean(dg)) if np.isfinite(dg).any() else math.nan,
        "offdiag": float(mean[off_sel].mean()) if off_sel.any() else math.nan,
        "diag_share": avg(diag_share),
        "sink_share": avg(sink_share),
        "distance": avg(wdist),
        "row_total": avg(total),
        "causal": float(causal),
    }


def top_cells(mean: np.ndarray, std: np.ndarray | None = None, k: int = 10) -> list[tuple[int, int, float, float]]:
    """The ``k`` cells with the largest finite mean: ``(i, j, mean, std)``, largest first."""
    flat = np.where(np.isfinite(mean), mean, -np.inf).ravel()
    k = min(k, int(np.isfinite(mean).sum()))
    if k <= 0:
        return []
    idx = np.argsort(-flat, kind="stable")[:k]
    out = []
    for f in idx:
        i, j = divmod(int(f), mean.shape[1])
        sd = float(std[i, j]) if std is not None else math.nan
        out.append((i, j, float(mean[i, j]), sd))
    return out


def pad_to(x: np.ndarray, s: int) -> np.ndarray:
    """``x`` grown to ``[s, s]`` with NaN in the new cells."""
    if x.shape[0] == s:
        return x
    out = np.full((s, s), np.nan)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def difference(mean_a: np.ndarray, mean_b: np.ndarray) -> dict[str, Any]:
    """``diff = B − A`` and ``log_ratio = log10(B / A)`` (0 where both are exactly 0, NaN where either
    side is missing or only one is ≤ 0),
    both on the larger of the two grids, plus scalar summaries."""
    s = max(mean_a.shape[0], mean_b.shape[0])
    a, b = pad_to(mean_a, s), pad_to(mean_b, s)
    diff = b - a
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where((a > 0) & (b > 0), np.log10(b / a), np.nan)
    ratio = np.where((a == 0) & (b == 0), 0.0, ratio)  # both exactly 0 (causal mask): no change
    both = np.isfinite(a) & np.isfinite(b)
    norm_a = float(np.sqrt((a[both] ** 2).sum()))
    norm_d = float(np.sqrt((diff[both] ** 2).sum()))
    return {
        "a": a, "b": b, "diff": diff, "log_ratio": ratio,
        "max_abs": float(np.abs(diff[both]).max()) if both.any() else math.nan,
        "rel_fro": norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf),
        "cells": int(both.sum()),
    }


def largest_differences(d: dict[str, Any], k: int = 10) -> list[tuple[int, int, float, float, float]]:
    """Cells with the largest |B − A|: ``(i, j, A, B, B − A)``, largest first (cells with both sides)."""
    diff = d["diff"]
    score = np.where(np.isfinite(diff), np.abs(diff), -np.inf).ravel()
    k = min(k, int(np.isfinite(diff).sum()))
    out = []
    for f in np.argsort(-score, kind="stable")[:k]:
        i, j = divmod(int(f), diff.shape[1])
        out.append((i, j, float(d["a"][i, j]), float(d["b"][i, j]), float(diff[i, j])))
    return out


def probe_noise_known(facts: dict, num_probes: Any = None) -> bool:
    """Whether a run's (or, with ``num_probes`` of a planned run's layer, that layer's) probe noise
    was measured: always for the deterministic estimators (exact, projection: it is zero), and for
    ``hutchinson`` only with K ≥ 2 — with one probe per sample the probe noise cannot be separated
    from the variation across samples."""
    if facts.get("estimator") != "hutchinson":
        return True
    try:
        return int((facts.get("num_probes") if num_probes is None else num_probes) or 1) >= 2
    except (TypeError, ValueError):
        return False


def layer_plans(manifest: dict) -> dict[int, dict]:
    """A planned run's per-layer plan (docs/DESIGN.md §1.11): ``{layer: {"mode", "num_probes", …}}``
    from the manifest's ``plan`` (the planner's, with ``predicted_rel_se`` and
    ``predicted_rel_probe_se``) or from a hand-written ``sensitivity.layer_plan``; ``{}`` for a run
    with one mode and K."""
    plan = manifest.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("layers"), dict):
        try:
            return {int(L): dict(v) for L, v in plan["layers"].items() if isinstance(v, dict)}
        except (TypeError, ValueError):
            return {}
    sens = get(manifest, "config", "sensitivity", default=None)
    out = {}
    for item in (sens.get("layer_plan") if isinstance(sens, dict) else None) or []:
        parts = str(item).split(":")
        if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
            out[int(parts[0])] = {"mode": parts[1], "num_probes": int(parts[2])}
    return out


def layer_probes(facts: dict, plans: dict[int, dict], layer: int) -> Any:
    """K of ``layer``: its plan's when the run is planned (``layer_plans``), else the run's."""
    return (plans.get(layer) or {}).get("num_probes", facts.get("num_probes"))


PROBE_UNKNOWN = "unknown (K=1; use K ≥ 2)"


def probe_part(se: dict[str, float], known: bool) -> str:
    """``probe part 3.2%`` or ``probe part unknown (K=1; use K ≥ 2)``."""
    return f"probe part {fmt(se['rel_probe_se'] * 100, 2)}%" if known else f"probe part {PROBE_UNKNOWN}"


def standard_errors(mean: np.ndarray, var: np.ndarray, probe_noise: np.ndarray,
                    cell_count: np.ndarray, probe_known: bool = True) -> dict[str, float]:
    """Median (over cells with n ≥ 2 and mean > 0) standard errors, absolute and relative to the mean.

    ``se``: standard error of a cell's dataset mean, sqrt(var / n) (includes probe noise).
    ``probe_se``: the part due to the estimator's probes, sqrt(mean probe variance / n).
    ``probe_se_sample``: one sample's probe standard error, sqrt(mean probe variance).
    The probe figures are NaN when ``probe_known`` is False (hutchinson with K=1: ``probe_noise_known``).
    """
    n = cell_count.astype(float)
    ok = np.isfinite(var) & (n >= 2) & np.isfinite(mean) & (mean > 0)
    if not ok.any():
        return {"se": math.nan, "rel_se": math.nan, "probe_se": math.nan, "rel_probe_se": math.nan,
                "probe_se_sample": math.nan}
    se = np.sqrt(var[ok] / n[ok])
    pn = np.where(np.isfinite(probe_noise[ok]), probe_noise[ok], 0.0) if probe_known else np.full(se.shape, np.nan)
    pse = np.sqrt(pn / n[ok])
    return {
        "se": float(np.median(se)), "rel_se": float(np.median(se / mean[ok])),
        "probe_se": float(np.median(pse)), "rel_probe_se": float(np.median(pse / mean[ok])),
        "probe_se_sample": float(np.median(np.sqrt(pn))),
    }


# ---------------------------------------------------------------------------- manifest helpers
def get(d: Any, *path: str, default: Any = None) -> Any:
    """``d[p0][p1]…`` or ``default`` when any step is missing."""
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def find_key(d: Any, names: Iterable[str], depth: int = 3) -> Any:
    """First scalar value stored under any of ``names`` in a nested dict (breadth-first)."""
    names = tuple(names)
    level = [d]
    for _ in range(depth + 1):
        nxt = []
        for node in level:
            if not isinstance(node, dict):
                continue
            for n in names:
                v = node.get(n)
                if v is not None and not isinstance(v, (dict, list)):
                    return v
            nxt.extend(v for v in node.values() if isinstance(v, dict))
        level = nxt
    return None


def run_facts(manifest: dict, layers: dict | None = None) -> dict[str, Any]:
    """The handful of facts every view shows, tolerant of missing manifest keys."""
    cfg = manifest.get("config") or {}
    model = manifest.get("model") or {}
    samples = manifest.get("samples") or {}
    timings = manifest.get("timings") or {}
    cfg_model = cfg.get("model")
    model_name = (model.get("name")
                  or (find_key(cfg_model, ("name", "path", "id")) if isinstance(cfg_model, dict) else cfg_model)
                  or model.get("model_type") or model.get("class") or "?")
    dataset = None
    for key in ("data", "dataset", "corpus"):
        v = cfg.get(key)
        if isinstance(v, str):
            dataset = v
        elif isinstance(v, dict):
            dataset = find_key(v, ("source", "name", "dataset", "path", "uri"))
        if dataset:
            break
    if dataset is None:
        dataset = find_key(manifest.get("corpus") or {}, ("source", "name", "path"))
    seq = manifest.get("seq_len")
    if seq is None and layers:
        seq = next(iter(layers.values())).mean.shape[0]
    count = samples.get("computed")
    if count is None and layers:
        count = next(iter(layers.values())).count
    sens = cfg.get("sensitivity") if isinstance(cfg.get("sensitivity"), dict) else {}
    return {
        "model": str(model_name), "model_class": model.get("class"), "model_type": model.get("model_type"),
        "dataset": str(dataset) if dataset is not None else "?",
        "estimator": str(manifest.get("estimator") or sens.get("estimator") or find_key(cfg, ("estimator",)) or "?"),
        "num_probes": manifest.get("num_probes", sens.get("num_probes")),
        "probe": sens.get("probe_distribution"),
        "seed": manifest.get("seed", sens.get("seed")),
        "precision": manifest.get("precision") or sens.get("precision") or "fp32",  # runs before the option: fp32
        "seq_len": seq, "max_seq_len": manifest.get("max_seq_len") or find_key(cfg, ("max_seq_len",)),
        "samples": count, "samples_total": samples.get("total"),
        "skipped": samples.get("skipped"), "wall_s": timings.get("wall_s"),
        "samples_per_s": timings.get("samples_per_s"),
        "layers": sorted(layers) if layers else manifest.get("layers"),
    }


def sample_lines(samples: dict, max_ids: int = 12) -> list[tuple[str, Any]]:
    """``samples`` manifest section as (key, value) pairs; long id lists are shortened."""
    out = []
    for k, v in flatten(samples):
        if isinstance(v, (list, tuple, dict)) and not v:
            continue
        if isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v[:max_ids])) + (f", … ({len(v)} in all)" if len(v) > max_ids else "")
        out.append((k, v))
    return out


def flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dict → ``[(dotted.key, value)]`` in insertion order (lists kept as values)."""
    if not isinstance(d, dict):
        return [(prefix or "value", d)]
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.extend(flatten(v, key))
        else:
            out.append((key, v))
    return out


def fmt(x: Any, digits: int = 3) -> str:
    """Compact human formatting for numbers (and pass-through for anything else)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if x == 0:
            return "0"
        if 1e-3 <= abs(x) < 1e5:
            return f"{x:.{digits}g}"
        return f"{x:.{digits - 1}e}"
    return str(x)
