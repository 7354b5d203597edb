"""PNG plots of a paired run (issue 29), added to ``<run>/plots/`` by ``plots.render_run_plots`` when the
manifest has ``"paired"``:

- ``layer_NNN_paired.png`` — left: the mean difference A(a) − A(b) with a diverging colour map centred
  at 0, coloured only where the cell changed at the run's FDR; cells tested but not significant are
  flat grey, cells identical on both sides in every pair (a causal map's j > i) white, cells with
  fewer than 2 pairs hatched. Right: per cell the paired SE of the mean difference over the unpaired
  SE at equal cost (below 1: pairing helped).
- ``paired_summary.png`` — per layer: the share of the tested cells that changed (a > b up, a < b
  down), the median paired / unpaired SE ratio, and for causal models Δp = p_a − p_b with its
  interval (``differences.py``).
"""

from __future__ import annotations

import math

import numpy as np

from . import analysis as an
from . import differences as dm
from . import paired as pr
from . import plot_parts as pp
from ..store.results import RunResult

NOT_SIGNIFICANT = "#c8c8c8"  # tested, q > FDR
IDENTICAL = "#ffffff"  # D = 0 in every pair (not tested): the causal mask, or two identical sides


def diff_panel(fig, ax, mean_diff: np.ndarray, significant: np.ndarray, tested: np.ndarray, *, title: str,
               label: str) -> dict:
    """Draw ``mean_diff`` where ``significant`` (diverging ``RdBu_r``, symmetric limits = the largest
    significant |difference|, symmetric-log when those span more than 3 decades); grey where tested and
    not significant, white where untested with a difference of exactly 0, hatched elsewhere. Returns
    the images (``"diff"``: the coloured one; its array is ``mean_diff`` masked where not significant)
    and which special cells occurred."""
    import matplotlib
    import matplotlib.colors as mcolors

    m = np.asarray(mean_diff, float)
    sig = np.asarray(significant, bool) & np.isfinite(m)
    tested = np.asarray(tested, bool)
    grey = tested & ~sig
    white = ~tested & (m == 0)
    s = m.shape[0]
    a = np.abs(m[sig])
    lim = float(a.max()) if a.size else 0.0
    symlog = bool(a.size and pp.wants_log(a, 3.0))
    if lim == 0:
        norm = mcolors.Normalize(vmin=-1, vmax=1)
    elif symlog:
        norm = mcolors.SymLogNorm(linthresh=float(a[a > 0].min()), linscale=0.5, vmin=-lim, vmax=lim, base=10)
    else:
        norm = mcolors.Normalize(vmin=-lim, vmax=lim)
    ax.set_facecolor(pp.NO_DATA)
    ax.patch.set_hatch("////")
    kw = dict(aspect="equal", origin="upper", interpolation="nearest")
    ims = {}
    for name, where, colour in (("grey", grey, NOT_SIGNIFICANT), ("white", white, IDENTICAL)):
        if where.any():
            ims[name] = ax.imshow(np.ma.masked_where(~where, np.ones_like(m)),
                                  cmap=mcolors.ListedColormap([colour]), vmin=0, vmax=1, **kw)
    cm = matplotlib.colormaps["RdBu_r"].with_extremes(bad=(0, 0, 0, 0))
    ims["diff"] = ax.imshow(np.ma.masked_where(~sig, m), cmap=cm, norm=norm, **kw)
    ax.set_xlim(-0.5, s - 0.5)
    ax.set_ylim(s - 0.5, -0.5)
    cb = fig.colorbar(ims["diff"], ax=ax, shrink=0.92, pad=0.02)
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


def layer_png(v: pr.PairedView, layer: int) -> bytes:
    d = v.diff(layer)
    s = v.summary(layer)
    a, b = v.labels
    mean = np.asarray(d["mean_diff"], float)
    tested = dm.tested_mask(d)
    sig = tested & (np.asarray(d["q"], float) <= s.fdr)
    with pp.style():
        fig, (a1, a2) = pp.new_figure(12.5, 5.9, 1, 2)
        flags = diff_panel(fig, a1, mean, sig, tested, label=f"mean {a} − {b}  of " + pp.SQ_NORM,
                           title=f"{s.changed:,} of {s.tested:,} cells changed at FDR {an.fmt(s.fdr * 100)} % "
                                 f"({s.up:,} up, {s.down:,} down)")
        if "se_unpaired" in d:
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(tested, np.asarray(d["se_diff"], float) / np.asarray(d["se_unpaired"], float), np.nan)
            white = ~tested & (mean == 0)  # identical in every pair: white here too
            ratio = np.where(np.isfinite(ratio), ratio, np.where(white, 0.0, np.nan))
            pp.heatmap(fig, a2, ratio, cmap="cividis", label="paired SE / unpaired SE",
                       title=f"paired / unpaired SE at equal cost (median {an.fmt(s.se_ratio, 3)})",
                       structural_zero=white)
        else:
            a2.set_axis_off()
        pp.suptitle(fig, f"{v.title()} — layer {layer} · {s.pairs:,} pairs · paired difference "
                         f"(Benjamini–Hochberg FDR {an.fmt(s.fdr * 100)} %)", fontweight="bold")
        _legend(fig, flags)
        return pp.to_png(fig)


def summary_png(v: pr.PairedView) -> bytes:
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
        ax.legend(loc="best", frameon=False)
        ax = axes[1]
        ax.plot(x, [s.se_ratio for s in sums], marker="o", color="C2", lw=1.5)
        ax.axhline(1.0, color="#777777", lw=1, ls="--")
        ax.set_ylabel("median paired SE / unpaired SE")
        ax.set_title("error of the difference: paired vs two runs")
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
            ax.set_ylabel(f"Δp = p({a}) − p({b})")
            ax.set_title("decay exponent difference (95 %; orange: excludes 0)")
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
    v = pr.view(run)
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
