"""Drawing helpers for :mod:`raysens.report.plots`: style, heatmaps with masked cells, line + band panels.

matplotlib is imported inside the functions (never at module import) and used through
``matplotlib.figure.Figure`` directly, without pyplot's global state, so rendering works in any
thread or Ray worker and never opens a window.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

DPI = 120
NO_DATA = "#d4d4d4"  # hatched background behind NaN cells
ZERO = "#ffffff"  # exactly-zero cells (causal mask)
STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "legend.fontsize": 8.5, "figure.titlesize": 12, "axes.grid": False,
    "axes.spines.top": False, "axes.spines.right": False, "hatch.color": "#9a9a9a", "hatch.linewidth": 0.6,
    "savefig.dpi": DPI, "figure.dpi": DPI, "image.interpolation": "nearest",
}
SQ_NORM = r"$\Vert J_{ij}\Vert_F^2$"


@contextmanager
def style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def new_figure(w: float, h: float, rows: int = 1, cols: int = 1, **kw: Any):
    """A constrained-layout Figure and its axes (squeezed like ``plt.subplots``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever the global backend is
    axes = fig.subplots(rows, cols, squeeze=True, **kw)
    return fig, axes


def suptitle(fig, text: str, **kw: Any):
    """The figure's title, placed above everything the layout engine arranged (``to_png`` saves with a
    tight box, so it is kept): constrained layout cannot always reserve room for it above
    equal-aspect panels, and it then sat on the middle panel's title."""
    return fig.suptitle(text, y=1.0, va="bottom", **kw)


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    # constrained layout cannot always fit equal-aspect panels + labels; "tight" never clips text
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=0.12)
    return buf.getvalue()


def wants_log(values: np.ndarray, decades: float = 2.0) -> bool:
    """True when the finite positive values span more than ``decades`` orders of magnitude."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    return v.size > 1 and float(v.max() / v.min()) > 10.0 ** decades


def position_ticks(ax, s: int, y: bool = True) -> None:
    """Integer ticks at sensible steps for S from 2 to several hundred (x only unless ``y``)."""
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis) if y else (ax.xaxis,):
        axis.set_major_locator(MaxNLocator(nbins=8 if s > 16 else s, integer=True, steps=[1, 2, 4, 5, 8, 10]))


MAX_PIXELS = 256  # a heatmap wider than this many cells is drawn as block means (long sequences)


def block_means(m: np.ndarray, k: int) -> np.ndarray:
    """``m[S, S]`` -> ``[ceil(S/k), ceil(S/k)]`` means of its k×k blocks over their finite cells (NaN
    where a block has none). Unlike the image's own resampling, no cell is dropped: a 2048² map at 256
    pixels shows every cell's contribution, not every 8th row and column."""
    s = m.shape[0]
    n = -(-s // k)
    pad = np.full((n * k, n * k), np.nan)
    pad[:s, :s] = m
    b = pad.reshape(n, k, n, k)
    fin = np.isfinite(b)
    cnt = fin.sum(axis=(1, 3))
    tot = np.where(fin, b, 0.0).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _block_all(z: np.ndarray, k: int) -> np.ndarray:
    s = z.shape[0]
    n = -(-s // k)
    pad = np.ones((n * k, n * k), bool)
    pad[:s, :s] = z
    return pad.reshape(n, k, n, k).all(axis=(1, 3))


def heatmap(fig, ax, m: np.ndarray, *, cmap: str, label: str, title: str, log: bool | None = None,
            structural_zero: np.ndarray | None = None) -> dict:
    """``m[pos_out, pos_in]`` as an image: y = output position i, x = input position j.

    Maps wider than ``MAX_PIXELS`` cells (long sequences) are drawn as the means of k×k blocks (the
    title says so); the axes keep the original positions.

    Exactly-zero cells inside ``structural_zero`` (the causal mask j > i) are white, NaN cells (no samples) show a hatched grey background; the colour
    scale is logarithmic when the positive values span more than two decades. Returns which special
    cells occurred (for a shared legend).
    """
    import matplotlib
    import matplotlib.colors as mcolors

    s = m.shape[0]
    if structural_zero is None:
        structural_zero = np.zeros(m.shape, bool)
    k = -(-s // MAX_PIXELS)
    if k > 1:  # long sequence: block means, every cell counted
        structural_zero = _block_all(structural_zero & (np.asarray(m) == 0), k)
        m = block_means(np.asarray(m, float), k)
        title = f"{title} ({k}×{k} block means)"
    fin = np.isfinite(m)
    zero = fin & (m == 0) & structural_zero
    pos = m[fin & (m > 0)]
    if log is None:
        log = wants_log(pos)
    cm = matplotlib.colormaps[cmap].with_extremes(bad=(0, 0, 0, 0))
    if log and pos.size:
        vmax = float(pos.max())
        vmin = max(float(pos.min()), vmax * 1e-12)
        # other zeros / tiny values (e.g. a variance of 0) take the bottom colour of the scale
        shown = np.where(fin & ~zero, np.maximum(m, vmin), np.nan)
        norm = mcolors.LogNorm(vmin=vmin, vmax=vmax)
    else:
        vals = m[fin & ~zero] if (fin & ~zero).any() else np.zeros(1)
        lo, hi = min(0.0, float(vals.min())), float(vals.max())
        if hi <= lo:
            hi = lo + 1.0
        shown = np.where(fin & ~zero, m, np.nan)
        norm = mcolors.Normalize(vmin=lo, vmax=hi)
    ax.set_facecolor(NO_DATA)
    ax.patch.set_hatch("////")
    ext = (-0.5, m.shape[0] * k - 0.5, m.shape[0] * k - 0.5, -0.5)  # original positions on the axes
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cm, norm=norm, aspect="equal", origin="upper", extent=ext)
    if zero.any():
        ax.imshow(np.ma.masked_where(~zero, np.ones_like(m)), cmap=mcolors.ListedColormap([ZERO]),
                  aspect="equal", origin="upper", vmin=0, vmax=1, extent=ext)
    ax.set_xlim(-0.5, s - 0.5)
    ax.set_ylim(s - 0.5, -0.5)
    cb = fig.colorbar(im, ax=ax, shrink=0.92, pad=0.02)
    cb.set_label(label + (" (log scale)" if log else ""))
    ax.set_title(title)
    ax.set_xlabel("input position j")
    ax.set_ylabel("output position i")
    position_ticks(ax, s)
    return {"zero": bool(zero.any()), "nan": bool((~fin).any()), "log": bool(log)}


def cell_legend(fig, flags: list[dict]) -> None:
    """A figure-level legend for white (exactly 0) and hatched (no samples) cells, if any occurred."""
    from matplotlib.patches import Patch

    handles = []
    if any(f["zero"] for f in flags):
        handles.append(Patch(facecolor=ZERO, edgecolor="#888888", label="exactly 0 (causal: j > i)"))
    if any(f["nan"] for f in flags):
        handles.append(Patch(facecolor=NO_DATA, edgecolor="#888888", hatch="////", label="no samples reached the cell"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)


def band_plot(ax, x: np.ndarray, y: np.ndarray, *, sd: np.ndarray | None = None, se: np.ndarray | None = None,
              color: str = "C0", label: str | None = None, log: bool | None = None) -> bool:
    """Line ``y(x)`` with a light ±1 s.d. band and a darker ±2 s.e. band; log y when the values span
    more than two decades (band floors are clipped to the axis). Returns whether y is logarithmic."""
    x, y = np.asarray(x), np.asarray(y, float)
    ok = np.isfinite(y)
    if log is None:
        log = wants_log(y[ok])
    floor = None
    if log:
        ypos = y[ok & (y > 0)]
        floor = float(ypos.min()) / 3 if ypos.size else 1e-12
    marker = "o" if len(x) <= 40 else None

    def lower(b: np.ndarray) -> np.ndarray:
        lo = y - b
        return np.maximum(lo, floor) if log else lo

    if sd is not None and np.isfinite(sd).any():
        b = np.where(np.isfinite(sd), sd, 0.0)
        ax.fill_between(x, lower(b), y + b, color=color, alpha=0.15, lw=0, label="±1 s.d. over samples")
    if se is not None and np.isfinite(se).any():
        b = 2 * np.where(np.isfinite(se), se, 0.0)
        ax.fill_between(x, lower(b), y + b, color=color, alpha=0.35, lw=0, label="±2 s.e. of the mean")
    ax.plot(x[ok], y[ok], color=color, lw=1.6, marker=marker, ms=3.5, label=label)
    if log:
        ax.set_yscale("log")
        top = np.nanmax(np.where(ok, y + (np.nan_to_num(sd) if sd is not None else 0), np.nan))
        ax.set_ylim(floor, top * 1.5 if np.isfinite(top) and top > 0 else None)
    ax.grid(True, which="major", color="#e6e6e6", lw=0.7)
    ax.set_axisbelow(True)
    return bool(log)


def diverging(fig, ax, m: np.ndarray, *, cmap: str, label: str, title: str, symlog: bool = False) -> None:
    """A map centred at 0 with symmetric limits; ``symlog`` (for differences of maps that span many
    decades) shows |m| down to 1e-4 of the largest value on a logarithmic scale, linear below."""
    import matplotlib
    import matplotlib.colors as mcolors

    s = m.shape[0]
    fin = np.isfinite(m)
    a = np.abs(m[fin])
    lim = float(a.max()) if a.size else 0.0
    ticks = None
    if lim == 0:
        norm = mcolors.Normalize(vmin=-1, vmax=1)
    elif symlog:
        top = np.floor(np.log10(lim))
        lin = 10.0 ** (top - 4)
        norm = mcolors.SymLogNorm(linthresh=lin, linscale=0.5, vmin=-lim, vmax=lim, base=10)
        dec = [10.0 ** k for k in np.arange(top, top - 4, -2)]
        ticks = sorted([-d for d in dec] + [0.0] + dec)
    else:
        norm = mcolors.Normalize(vmin=-lim, vmax=lim)
    cm = matplotlib.colormaps[cmap].with_extremes(bad=(0, 0, 0, 0))
    ax.set_facecolor(NO_DATA)
    ax.patch.set_hatch("////")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cm, norm=norm, aspect="equal", origin="upper")
    cb = fig.colorbar(im, ax=ax, shrink=0.92, pad=0.02, ticks=ticks)
    cb.set_label(label + (" (symmetric log)" if symlog and lim > 0 else ""))
    ax.set_title(title)
    ax.set_xlabel("input position j")
    ax.set_ylabel("output position i")
    position_ticks(ax, s)
