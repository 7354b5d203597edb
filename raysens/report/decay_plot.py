"""``plots/decay.png``: the decay law G(r) = γ + β (r+1)^(−p) per layer (``raysens.report.decay``).

Left: p per layer with its profile-likelihood interval as error bars (an open end — the interval
reaches the search bound — is drawn as an arrow); layers without a fit are named below the axis.
Right: each fitted layer's G(r) (points, ±2 se) and its fitted curve, on log–log axes over r + 1.
"""

from __future__ import annotations

import numpy as np

from . import plot_parts as pp
from .decay import DecayFit


def decay_png(fits: dict[int, tuple[DecayFit | None, str]], title: str) -> bytes:
    from matplotlib.ticker import MaxNLocator

    ok = {L: f for L, (f, _) in sorted(fits.items()) if f is not None}
    missing = [L for L, (f, _) in sorted(fits.items()) if f is None]
    with pp.style():
        fig, (a1, a2) = pp.new_figure(12.5, 4.8, 1, 2)
        if ok:
            layers = np.array(sorted(ok), float)
            p = np.array([ok[L].p for L in sorted(ok)])
            lo = np.array([ok[L].p_lo for L in sorted(ok)])
            hi = np.array([ok[L].p_hi for L in sorted(ok)])
            a1.errorbar(layers, p, yerr=[p - lo, hi - p], fmt="o", ms=5, color="C0", ecolor="C0", capsize=3,
                        lw=1.4, label=f"p with its {next(iter(ok.values())).level:.0%} interval (profile likelihood)")
            for L in sorted(ok):
                f = ok[L]
                for end, up in ((f.p_lo, False), (f.p_hi, True)):
                    if (f.hi_open if up else f.lo_open):
                        a1.annotate("", (L, end), (L, f.p), arrowprops=dict(arrowstyle="->", color="C3", lw=1.2))
            span = np.concatenate([lo, hi, p])
            a1.set_ylim(float(span.min()) - 0.1 * (np.ptp(span) + 0.1), float(span.max()) + 0.1 * (np.ptp(span) + 0.1))
            a1.set_xlim(layers.min() - 0.6, layers.max() + 0.6)
            a1.legend(loc="best", frameon=False, fontsize=8)
        a1.set_xlabel("layer" + (f"   (no fit: {', '.join(map(str, missing))})" if missing else ""))
        a1.set_ylabel("decay exponent p")
        a1.set_title(r"$G(r) = \gamma + \beta\,(r+1)^{-p}$: exponent per layer")
        a1.grid(True, color="#e6e6e6", lw=0.7)
        a1.xaxis.set_major_locator(MaxNLocator(integer=True))
        cmap = pp_colormap(len(ok))
        for k, (L, f) in enumerate(sorted(ok.items())):
            x = f.r + 1.0
            c = cmap(k)
            a2.errorbar(x, f.g, yerr=2 * f.se, fmt="o", ms=2.5, color=c, lw=0.8, alpha=0.8)
            xx = np.geomspace(x.min(), x.max(), 200)
            a2.plot(xx, f.predict(xx - 1.0), color=c, lw=1.4, label=f"layer {L}: p = {f.p:.3g}")
        if ok:
            a2.set_xscale("log")
            g = np.concatenate([f.g for f in ok.values()])
            if (g > 0).all():
                a2.set_yscale("log")
            a2.legend(loc="best", frameon=False, fontsize=7 if len(ok) <= 8 else 5.5, ncol=1 if len(ok) <= 8 else 2)
        else:
            a2.text(0.5, 0.5, "no layer fitted", ha="center", va="center", transform=a2.transAxes)
        a2.set_xlabel("r + 1   (r = i − j, tokens)")
        a2.set_ylabel(r"$G(r)$: mean over the cells at distance r")
        a2.set_title("distance profile (±2 se) and fitted law")
        a2.grid(True, color="#e6e6e6", lw=0.7)
        pp.suptitle(fig, title, fontweight="bold")
        return pp.to_png(fig)


def pp_colormap(n: int):
    """Distinct colours for ``n`` layers (tab10 up to 10, viridis beyond)."""
    from matplotlib import colormaps

    if n <= 10:
        return lambda k: f"C{k}"
    cm = colormaps["viridis"]
    return lambda k: cm(k / max(n - 1, 1))
