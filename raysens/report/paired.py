"""A paired run as the report sees it: the manifest's ``"paired"`` key, side b's stats and the difference
arrays per layer (read through ``store/paired_results.py``), and the text ``raysens show`` prints for it.

A paired run directory is also an ordinary run of side a (``stats/layer_LLL.npz``), so everything else in
``raysens.report`` works on it unchanged; this module adds what only a paired run has. The numbers are
``differences.py``'s.

Plots (PNG), added to ``<run>/plots/`` by ``plots.render_run_plots`` when the manifest has
``"paired"`` (matplotlib is imported only when one is drawn):

- ``layer_NNN_paired.png`` — left: the mean difference A(a) − A(b) with a diverging colour map centred
  at 0, coloured only where the cell changed at the run's FDR; cells tested but not significant are
  flat grey, cells identical on both sides in every pair (a causal map's j > i) white, cells with
  fewer than 2 pairs hatched. Right: per cell the paired SE of the mean difference over the unpaired
  SE at equal cost (below 1: pairing helped).
- ``paired_summary.png`` — per layer: the share of the tested cells that changed (a > b up, a < b
  down), the median paired / unpaired SE ratio, and for causal models Δp = p_a − p_b with its
  interval (``differences.py``).

Why this module is long: everything the report shows that only a paired run has — reading it, the
``show`` text and its two plots — in one place, so the report package keeps one module per concern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import analysis as an
from . import differences as dm
from . import plot_parts as pp
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


NOT_COMMON = ("the two sides drew different probes (different hidden sizes): the probe noise does not cancel in "
              "the differences, only the data part does")


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
        lines.append("  layer map  " + ", ".join(f"a {k} ↔ b {w}" for k, w in lm.items()))
    if v.info.get("common_probes") is False:
        lines.append(f"  note       {NOT_COMMON}")
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
                text = f"{an.fmt(fit.p)} {fit.interval()}" if fit is not None else f"no fit: {why}"
                lines.append(f"  p ({lab}): {text}")
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


# ---------------------------------------------------------------------------- plots
NOT_SIGNIFICANT = "#c8c8c8"  # tested, q > FDR
IDENTICAL = "#ffffff"  # D = 0 in every pair (not tested): the causal mask, or two identical sides


def block_view(mean_diff: np.ndarray, significant: np.ndarray, tested: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A long map as k×k blocks (like ``plot_parts.heatmap``): per block the mean of its significant
    cells' differences, significant where any cell is, tested where any cell is; a block of untested
    cells keeps a difference of 0 only if all of them have it."""
    m = np.asarray(mean_diff, float)
    sig = np.asarray(significant, bool) & np.isfinite(m)
    bm = pp.block_means(np.where(sig, m, np.nan), k)
    s = m.shape[0]
    n = -(-s // k)

    def any_(z: np.ndarray) -> np.ndarray:
        pad = np.zeros((n * k, n * k), bool)
        pad[:s, :s] = z
        return pad.reshape(n, k, n, k).any(axis=(1, 3))

    bsig, btest = any_(sig), any_(np.asarray(tested, bool))
    nonzero = any_(~(m == 0))
    return np.where(bsig, bm, np.where(nonzero, np.nan, 0.0)), bsig, btest


def diff_panel(fig, ax, cells: tuple[np.ndarray, np.ndarray, np.ndarray], *, title: str, label: str,
               block: int = 1, size: int | None = None) -> dict:
    """``cells`` = ``(mean_diff, significant, tested)``, ``[pos_out, pos_in]`` each. Draw ``mean_diff`` where ``significant`` (diverging ``RdBu_r``, symmetric limits = the largest
    significant |difference|, symmetric-log, at most 3 decades, when those span more than 2); grey where tested and
    not significant, white where untested with a difference of exactly 0, hatched elsewhere. Returns
    the images (``"diff"``: the coloured one; its array is ``mean_diff`` masked where not significant)
    and which special cells occurred."""
    import matplotlib
    import matplotlib.colors as mcolors

    mean_diff, significant, tested = cells
    m = np.asarray(mean_diff, float)
    sig = np.asarray(significant, bool) & np.isfinite(m)
    tested = np.asarray(tested, bool)
    grey = tested & ~sig
    white = ~tested & (m == 0)
    a = np.abs(m[sig])
    lim = float(a.max()) if a.size else 0.0
    symlog = bool(a.size and pp.wants_log(a, 2.0))
    ticks = None
    if lim == 0:
        norm = mcolors.Normalize(vmin=-1, vmax=1)
    elif symlog:
        lin = max(float(a[a > 0].min()), lim * 1e-3)
        norm = mcolors.SymLogNorm(linthresh=lin, linscale=0.5, vmin=-lim, vmax=lim, base=10)  # ≤ 3 decades log
        dec = [10.0 ** e for e in np.arange(np.floor(np.log10(lim)), np.log10(lin), -1.0)]
        ticks = sorted([-x for x in dec] + [0.0] + dec)
    else:
        norm = mcolors.Normalize(vmin=-lim, vmax=lim)
    ax.set_facecolor(pp.NO_DATA)
    ax.patch.set_hatch("////")
    n = m.shape[0] * block  # a block map (``block_view``) on the original positions
    s = size or n
    kw = dict(aspect="equal", origin="upper", interpolation="nearest", extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    ims = {}
    for name, where, colour in (("grey", grey, NOT_SIGNIFICANT), ("white", white, IDENTICAL)):
        if where.any():
            ims[name] = ax.imshow(np.ma.masked_where(~where, np.ones_like(m)),
                                  cmap=mcolors.ListedColormap([colour]), vmin=0, vmax=1, **kw)
    cm = matplotlib.colormaps["RdBu_r"].with_extremes(bad=(0, 0, 0, 0))
    ims["diff"] = ax.imshow(np.ma.masked_where(~sig, m), cmap=cm, norm=norm, **kw)
    ax.set_xlim(-0.5, s - 0.5)
    ax.set_ylim(s - 0.5, -0.5)
    cb = fig.colorbar(ims["diff"], ax=ax, shrink=0.92, pad=0.02, ticks=ticks)
    cb.set_label(label + (" (symmetric log)" if symlog else ""))
    ax.set_title(title)
    ax.set_xlabel("input position j")
    ax.set_ylabel("output position i")
    pp.position_ticks(ax, s)
    return {"images": ims, "grey": bool(grey.any()), "white": bool(white.any()),
            "nan": bool((~tested & ~white).any())}


def _legend(fig, flags: dict) -> None:
    from matplotlib.patches import Patch

    h = []
    if flags["grey"]:
        h.append(Patch(facecolor=NOT_SIGNIFICANT, edgecolor="#888888", label="tested, not significant"))
    if flags["white"]:
        h.append(Patch(facecolor=IDENTICAL, edgecolor="#888888", label="identical in every pair (not tested)"))
    if flags["nan"]:
        h.append(Patch(facecolor=pp.NO_DATA, edgecolor="#888888", hatch="////", label="fewer than 2 pairs"))
    if h:
        fig.legend(handles=h, loc="outside lower center", ncols=len(h), frameon=False)


def layer_png(v: PairedView, layer: int) -> bytes:
    d = v.diff(layer)
    s = v.summary(layer)
    a, b = v.labels
    mean = np.asarray(d["mean_diff"], float)
    tested = dm.tested_mask(d)
    sig = tested & (np.asarray(d["q"], float) <= s.fdr)
    title = f"{s.changed:,} of {s.tested:,} cells changed at FDR {an.fmt(s.fdr * 100)} % ({s.up:,} up, {s.down:,} down)"
    k = -(-mean.shape[0] // pp.MAX_PIXELS)
    shown = (mean, sig, tested)
    if k > 1:  # a long sequence: k×k blocks, each coloured by its changed cells (none: grey)
        shown = block_view(mean, sig, tested, k)
        title += f"\n({k}×{k} blocks: the mean over a block's changed cells)"
    with pp.style():
        fig, (a1, a2) = pp.new_figure(12.5, 5.9, 1, 2)
        flags = diff_panel(fig, a1, tuple(shown), label=f"mean {a} − {b}  of " + pp.SQ_NORM, title=title, block=k,
                           size=mean.shape[0])
        if "se_unpaired" in d:
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(tested, np.asarray(d["se_diff"], float) / np.asarray(d["se_unpaired"], float), np.nan)
            white = ~tested & (mean == 0)  # identical in every pair: white here too
            ratio = np.where(np.isfinite(ratio), ratio, np.where(white, 0.0, np.nan))
            pp.heatmap(fig, a2, ratio, cmap="cividis", label="paired SE / unpaired SE",
                       title=f"paired / unpaired SE (median {an.fmt(s.se_ratio, 3)})",
                       structural_zero=white)
        else:
            a2.set_axis_off()
        pp.suptitle(fig, f"{v.title()} — layer {layer} · {s.pairs:,} pairs · paired difference "
                         f"(Benjamini–Hochberg FDR {an.fmt(s.fdr * 100)} %)", fontweight="bold")
        _legend(fig, flags)
        return pp.to_png(fig)


def summary_png(v: PairedView) -> bytes:
    """Share changed per layer (up / down), the SE ratio, and Δp with its interval (causal models)."""
    from matplotlib.ticker import MaxNLocator

    layers = [L for L in v.layers]
    sums = [v.summary(L) for L in layers]
    causal = v.causal()
    a, b = v.labels
    with pp.style():
        fig, axes = pp.new_figure(15.0 if causal else 10.5, 4.4, 1, 3 if causal else 2)
        x = np.asarray(layers)
        up = np.array([100 * s.up / s.tested if s.tested else np.nan for s in sums])
        down = np.array([100 * s.down / s.tested if s.tested else np.nan for s in sums])
        ax = axes[0]
        ax.bar(x, np.nan_to_num(up), color="C3", width=0.7, label=f"up ({a} > {b})")
        ax.bar(x, np.nan_to_num(down), bottom=np.nan_to_num(up), color="C0", width=0.7, label=f"down ({a} < {b})")
        ax.set_ylabel("% of the tested cells")
        ax.set_title(f"cells changed (FDR {an.fmt(v.fdr * 100)} %)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False, fontsize="small")
        ax = axes[1]
        ratios = np.array([s.se_ratio for s in sums], float)
        ax.plot(x, ratios, marker="o", color="C2", lw=1.5)
        ax.axhline(1.0, color="#777777", lw=1, ls="--")
        ax.set_ylabel("median paired SE / unpaired SE")
        ax.set_title("error of the difference: paired vs two runs")
        pos = ratios[np.isfinite(ratios) & (ratios > 0)]
        if pos.size and pos.min() < 0.1:  # close sides: the ratio spans decades (1/sqrt(1 − ρ))
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        if causal:
            ax = axes[2]
            for L in layers:
                dp = v.decay(L)["dp"][0]
                if dp is None:
                    continue
                lo = dp.lo if math.isfinite(dp.lo) else dp.dp
                hi = dp.hi if math.isfinite(dp.hi) else dp.dp
                ax.errorbar([L], [dp.dp], yerr=[[dp.dp - lo], [hi - dp.dp]], fmt="o", color="C1" if
                            dp.excludes_zero() else "C7", capsize=3, ms=5)
            ax.axhline(0.0, color="#777777", lw=1, ls="--")
            ax.set_ylabel("Δp = p(a) − p(b)")
            ax.set_title("decay exponent: Δp, 95 % interval (orange: excludes 0)")
        for ax in np.atleast_1d(axes):
            ax.set_xlabel("layer")
            ax.grid(True, color="#e6e6e6", lw=0.7)
            ax.set_axisbelow(True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        pp.suptitle(fig, f"{v.title()} — paired run, per layer", fontweight="bold")
        return pp.to_png(fig)


def render_paired_plots(run: RunResult) -> dict[str, bytes]:
    """``{file name: PNG}`` for a paired run (empty for an ordinary run); layers whose difference file
    cannot be read are left out."""
    v = view(run)
    if v is None:
        return {}
    out = {}
    ok = []
    for L in v.layers:
        try:
            v.summary(L)
        except (OSError, ValueError, KeyError):
            continue
        ok.append(L)
        out[f"layer_{L:03d}_paired.png"] = layer_png(v, L)
    v.layers = ok
    if ok:
        out["paired_summary.png"] = summary_png(v)
    return out
