"""A paired run as the report sees it: the manifest's ``"paired"`` key, side b's stats and the difference
arrays per layer (read through ``store/paired_results.py``), and the text ``raysens show`` prints for it.

A paired run directory is also an ordinary run of side a (``stats/layer_LLL.npz``), so everything else in
``raysens.report`` works on it unchanged; this module adds what only a paired run has. The numbers are
``differences.py``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import analysis as an
from . import differences as dm
from .samples_needed import check_target
from ..store.results import RunResult


def is_paired(run: RunResult) -> bool:
    """True when the run's manifest has a ``"paired"`` mapping (a paired run, issue 29)."""
    return isinstance(run.manifest.get("paired"), dict)


def _side_name(side: Any, default: str) -> str:
    if isinstance(side, dict):
        for k in ("label", "name"):
            if side.get(k):
                return str(side[k])
    return default


@dataclass
class PairedView:
    """Side b and the differences of a loaded paired run, read per layer on first use."""

    run: RunResult
    info: dict
    labels: tuple[str, str]
    fdr: float
    layers: list[int]
    _b: dict = field(default_factory=dict, repr=False)
    _d: dict = field(default_factory=dict, repr=False)
    _sum: dict = field(default_factory=dict, repr=False)
    _dec: dict = field(default_factory=dict, repr=False)

    def b(self, layer: int):
        """Side b's ``LayerStats`` of ``layer``."""
        if layer not in self._b:
            from ..store import paired_results

            self._b[layer] = paired_results.read_side(self.run.path, layer, "b")
        return self._b[layer]

    def diff(self, layer: int) -> dict:
        """The layer's difference arrays (``paired_results.read_diff_stats``)."""
        if layer not in self._d:
            from ..store import paired_results

            self._d[layer] = paired_results.read_diff_stats(self.run.path, layer)
        return self._d[layer]

    def summary(self, layer: int) -> dm.LayerDifference:
        if layer not in self._sum:
            self._sum[layer] = dm.layer_difference(layer, self.diff(layer), self.fdr)
        return self._sum[layer]

    def decay(self, layer: int) -> dict[str, tuple]:
        """``differences.paired_decay`` of the layer: each side's fit and Δp (the joint fit with the
        paired covariance)."""
        if layer not in self._dec:
            self._dec[layer] = dm.paired_decay(self.run.layers[layer], self.b(layer), self.diff(layer))
        return self._dec[layer]

    def causal(self) -> bool:
        return any(an.is_causal(self.run.layers[L].mean) for L in self.layers)

    def title(self) -> str:
        """``a: SmolLM2 vs b: SmolLM2 (layers.3.mlp × 1.01)``."""
        a, b = self.labels
        return f"{a} − {b}"


def view(run: RunResult) -> PairedView | None:
    """The paired part of a loaded run, or None for an ordinary run. Layers: side a's layers that the
    manifest lists under ``stats_diff`` (all of side a's when the key is absent)."""
    if not is_paired(run):
        return None
    info = run.manifest["paired"]
    labels = info.get("labels")
    if not (isinstance(labels, (list, tuple)) and len(labels) == 2):
        labels = (_side_name(info.get("a"), "a"), _side_name(info.get("b"), "b"))
    if labels[0] == labels[1]:
        labels = (f"a: {labels[0]}", f"b: {labels[1]}")
    listed = info.get("stats_diff")
    layers = sorted(L for L in run.layers if not isinstance(listed, dict) or str(L) in listed or L in listed)
    fdr = info.get("fdr", 0.05)
    return PairedView(run, info, (str(labels[0]), str(labels[1])), float(fdr if fdr is not None else 0.05), layers)


def _side_text(side: Any) -> str:
    if not isinstance(side, dict):
        return str(side) if side is not None else "?"
    bits = [str(side.get("name") or side.get("label") or "?")]
    for k in ("precision", "random_init", "init_seed", "scale", "checkpoint", "revision"):
        v = side.get(k)
        if v not in (None, False, "", {}):
            bits.append(f"{k} {v}")
    return ", ".join(bits)


def format_paired(v: PairedView, layers: Sequence[int] | None = None, top: int = 5,
                  target_se: float | None = None) -> list[str]:
    """``raysens show`` lines of a paired run: the sides, per layer the difference summary (sentence,
    SEs, ratio, largest changes), p per side and Δp, and with ``target_se`` the samples a claim about the
    difference needs."""
    a, b = v.labels
    lines = ["", f"paired run: {a} − {b} (D = A({a}) − A({b}) per sample, same tokens and probes; "
                 f"Benjamini–Hochberg FDR {an.fmt(v.fdr * 100)} % per layer)",
             f"  a          {_side_text(v.info.get('a'))}",
             f"  b          {_side_text(v.info.get('b'))}"]
    lm = v.info.get("layer_map")
    if lm:
        lines.append(f"  layer map  " + ", ".join(f"a {k} ↔ b {w}" for k, w in lm.items()))
    if target_se is not None:
        target_se = check_target(target_se)
    for L in v.layers:
        if layers and L not in layers:
            continue
        try:
            s = v.summary(L)
        except (OSError, ValueError, KeyError) as e:  # a layer without its diff file: say so, keep going
            lines += ["", f"paired layer {L}: no difference statistics ({e})"]
            continue
        lines += ["", f"paired layer {L}  ({s.pairs:,} pairs)", f"  {s.sentence(v.labels)}",
                  f"  {s.se_text()}", f"  {s.times_text(v.labels)}"]
        if s.top:
            lines.append(f"  largest changes:  {'i':>4}  {'j':>4}  {'a − b':>14}  {'SE':>10}  {'q':>9}")
            for i, j, m, se, q in s.top[:top]:
                lines.append(f"  {'':16}  {i:>4}  {j:>4}  {m:>+14.4e}  {se:>10.3e}  {q:>9.2e}")
        if an.is_causal(v.run.layers[L].mean):
            dec = v.decay(L)
            for side, lab in (("a", a), ("b", b)):
                fit, why = dec[side]
                lines.append(f"  p ({lab}): " + (f"{an.fmt(fit.p)} {fit.interval()}" if fit is not None else f"no fit: {why}"))
            dp, why = dec["dp"]
            lines.append(f"  {dp.text()}" + (" — excludes 0" if dp.excludes_zero() else " — includes 0")
                         if dp is not None else f"  Δp: none ({why})")
        if target_se is not None:
            lines += difference_target_lines(v.diff(L), target_se, v.fdr)
    return lines


def difference_target_lines(d: dict, target: float, fdr: float) -> list[str]:
    p = dm.difference_precision(d, target, fdr)
    if not p["cells"]:
        return ["  samples a claim needs: no cell with a non-zero mean difference and an SE"]
    out = [f"  samples a claim needs (relative SE of the mean difference, target {an.fmt(target * 100, 3)}%; "
           f"over the {p['cells']:,} {p['over']}):"]
    for name in ("median", "p90"):
        r, n = p[f"rel_{name}"], p[f"n_needed_{name}"]
        need = "–" if not math.isfinite(n) else (
            f"{int(n):,} pairs (met: the run has {p['count']:,})" if p[f"meets_{name}"]
            else f"{int(n):,} pairs ({an.fmt(n / max(p['count'], 1), 2)}× the run's {p['count']:,})")
        out.append(f"    {name:<6} {an.fmt(r * 100, 3)}%: {need}")
    return out
