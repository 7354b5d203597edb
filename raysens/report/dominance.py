"""Which cells and rows one sample dominates (numpy only; docs/results.md "What drives a cell").

A cell (i, j) is **dominated** when its largest sample carries more than ``share`` (default 50 %) of
the cell's sum over samples, ``max / sum > share``, and at least two samples reached it (with one
sample every cell is trivially 100 %). A row i is dominated when one sample's row total
``Σ_j A_ij`` is more than ``share`` of the row's total over samples (``row_share``). For reference:
with n samples of equal weight a share is 1/n; a single sample carrying all of a cell's mass gives
std/mean = √n.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

DEFAULT_SHARE = 0.5


def available(ls: Any) -> bool:
    """True when the layer statistics carry extremes (runs written before them do not)."""
    return getattr(ls, "max_share", None) is not None and getattr(ls, "row_share", None) is not None


def top_rows(ls: Any, k: int = 5) -> list[dict]:
    """The ``k`` rows with the largest share of one sample, largest first:
    ``{i, share, sample_id, row_max, row_total}``."""
    if not available(ls):
        return []
    sh = np.where(np.isfinite(ls.row_share), ls.row_share, -1.0)
    row_total = np.nansum(ls.sum, axis=1)
    out = []
    for i in np.argsort(-sh, kind="stable")[:k]:
        if sh[i] < 0:
            break
        out.append({"i": int(i), "share": float(ls.row_share[i]), "sample_id": int(ls.row_max_sample_id[i]),
                    "row_max": float(ls.row_max[i]), "row_total": float(row_total[i])})
    return out


def dominated_rows(ls: Any, share: float = DEFAULT_SHARE) -> list[dict]:
    """Rows whose largest sample carries more than ``share`` of the row total (``top_rows`` format)."""
    if not available(ls):
        return []
    return [r for r in top_rows(ls, ls.row_share.shape[0]) if r["share"] > share and _row_n(ls, r["i"]) >= 2]


def _row_n(ls: Any, i: int) -> int:
    return int(ls.cell_count[i].max()) if ls.cell_count[i].size else 0


def dominated_cells(ls: Any, share: float = DEFAULT_SHARE, k: int | None = 20) -> list[dict]:
    """Cells (n ≥ 2) whose largest sample carries more than ``share`` of the cell's sum, largest
    share first (ties: larger mean first): ``{i, j, share, sample_id, max, mean, median, n}``."""
    if not available(ls):
        return []
    ms = np.where(np.isfinite(ls.max_share) & (ls.cell_count >= 2), ls.max_share, -1.0)
    sel = np.argwhere(ms > share)
    mean = np.nan_to_num(ls.mean, nan=0.0)
    order = sorted(map(tuple, sel), key=lambda ij: (-ms[ij], -mean[ij], ij))
    med = ls.median if ls.median is not None else np.full(ls.mean.shape, np.nan)
    return [{"i": int(i), "j": int(j), "share": float(ls.max_share[i, j]), "sample_id": int(ls.max_sample_id[i, j]),
             "max": float(ls.max[i, j]), "mean": float(ls.mean[i, j]), "median": float(med[i, j]),
             "n": int(ls.cell_count[i, j])} for i, j in order[:k]]


def summary(ls: Any, share: float = DEFAULT_SHARE) -> dict:
    """How much of the map one sample dominates: counts of dominated cells / rows, the cells with at
    least two samples and a positive sum, and the sample_ids that dominate most cells."""
    if not available(ls):
        return {}
    eligible = np.isfinite(ls.max_share) & (ls.cell_count >= 2)
    dom = eligible & (ls.max_share > share)
    who = Counter(ls.max_sample_id[dom].tolist())
    return {"share": share, "cells": int(dom.sum()), "eligible": int(eligible.sum()),
            "rows": len(dominated_rows(ls, share)), "by_sample": who.most_common(10),
            "median_share": float(np.median(ls.max_share[eligible])) if eligible.any() else float("nan")}


def culprits(ls: Any, share: float = DEFAULT_SHARE, k: int = 20) -> list[int]:
    """sample_ids named by the dominated rows and cells (rows first), without repeats."""
    ids = [r["sample_id"] for r in dominated_rows(ls, share)] + [c["sample_id"] for c in dominated_cells(ls, share, k)]
    return list(dict.fromkeys(i for i in ids if i >= 0))
