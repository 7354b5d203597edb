"""PNG plots of a run directory (and of two runs, and of a sweep of runs).

``write_run_plots(run_dir)`` writes into ``<run>/plots/``:

- ``layer_NNN_heatmap.png`` — mean, median (when the run has quantiles) and std of ‖J_ij‖_F²
  (y: output position i, x: input position j; log colour scale when the values span > 2 decades;
  white = exactly 0, hatched = no samples);
- ``layer_NNN_dominance.png`` — share of each cell's sum carried by its largest sample, and each
  row's share of its largest sample (rows above the threshold are labelled with the sample_id);
- ``layer_NNN_distance.png`` — sensitivity against distance i − j (mean over the cells at each
  distance, ±1 s.d. over samples and ±2 s.e. of the mean; causal runs: the fitted decay law);
- ``layer_NNN_sink.png`` — the first-token ("sink") column A[i, 0] and its share of the row total;
- ``layers_summary.png`` — per-layer summaries across layers;
- ``decay.png`` — causal runs: the exponent p of G(r) = γ + β (r+1)^(−p) per layer with its
  interval, and each layer's distance profile with the fitted law (``decay_plot.py``).
- paired runs (manifest ``"paired"``, issue 29): ``layer_NNN_paired.png`` (the mean difference a − b,
  cells that did not change at the run's FDR greyed) and ``paired_summary.png`` (``paired.py``).

``write_compare_plots(run_a, run_b, out_dir)`` writes ``compare_layer_NNN.png`` (B − A and
log10(B / A) per common layer). Works on local paths and ``pyarrow.fs`` URIs. matplotlib is only
imported when a plot is drawn (``pip install raysens[plots]``).

Why this module is long: one function per plot kind and the writers for a run, a comparison and a
sweep, which share the loading, titles and colour-scale helpers.
"""

from __future__ import annotations

import os
import posixpath
from typing import Sequence, Union

import numpy as np

from . import analysis as an
from . import decay
from . import dominance as dom
from . import plot_parts as pp
from ..store.results import LayerStats, RunResult, load_run, resolve, write_bytes

RunLike = Union[str, RunResult]


def _load(run: RunLike) -> RunResult:
    return run if isinstance(run, RunResult) else load_run(run)


def _describe(run: RunResult, ls: LayerStats) -> str:
    f = an.run_facts(run.manifest, run.layers)
    est = f["estimator"]
    plan = an.layer_plans(run.manifest).get(ls.layer)
    if est == "hutchinson" and plan:
        est += f" ({plan.get('mode')}, K={plan.get('num_probes')}, planned)"
    elif est == "hutchinson" and f["num_probes"]:
        est += f" (K={f['num_probes']})"
    return f"layer {ls.layer} · {est} · {ls.count:,} samples"


def _model(run: RunResult) -> str:
    f = an.run_facts(run.manifest, run.layers)
    return f["model"] if f["model"] != "?" else posixpath.basename(str(run.path).rstrip("/"))


def _std_title(run: RunResult, ls: LayerStats) -> str:
    """The heatmap shows the raw std; say when it includes the estimator's probe noise, and when
    that noise's size is unknown (hutchinson with K=1)."""
    f = an.run_facts(run.manifest, run.layers)
    if not an.probe_noise_known(f, an.layer_probes(f, an.layer_plans(run.manifest), ls.layer)):
        return "std over samples (incl. probe noise of unknown size: K=1)"
    if np.nan_to_num(ls.probe_noise).any():
        return "std over samples (incl. probe noise)"
    return "std over samples"


def _bound_text(ls: LayerStats) -> str:
    """The median's stated relative error: the largest per-cell bound of the layer (files before issue
    18 had the fixed histogram's 7.5 %)."""
    b = getattr(ls, "quantile_bound", None)
    b = None if b is None else np.asarray(b, float)
    if b is None or not np.isfinite(b).any():
        return "±7.5 %"
    return f"≤ ±{100 * float(np.nanmax(b)):.1f} %"


def _causal_mask(ls: LayerStats) -> np.ndarray:
    """Cells that are zero by construction (j > i) when the model is causal, else none."""
    s = ls.mean.shape[0]
    return np.triu(np.ones((s, s), bool), k=1) if an.is_causal(ls.mean) else np.zeros((s, s), bool)


# ---------------------------------------------------------------------------- one run
def heatmap_png(run: RunResult, ls: LayerStats) -> bytes:
    med = getattr(ls, "median", None)
    with pp.style():
        fig, axes = pp.new_figure(18.0 if med is not None else 12.5, 5.6, 1, 3 if med is not None else 2)
        cz = _causal_mask(ls)
        flags = [pp.heatmap(fig, axes[0], ls.mean, cmap="viridis", label="mean " + pp.SQ_NORM,
                            title=r"mean over samples  $E[A_{ij}]$", structural_zero=cz)]
        if med is not None:  # one sample cannot move the median: compare with the mean
            flags.append(pp.heatmap(fig, axes[1], med, cmap="viridis", label="median " + pp.SQ_NORM,
                                    title=f"median over samples (log histogram, {_bound_text(ls)})", structural_zero=cz))
        flags.append(pp.heatmap(fig, axes[-1], ls.std, cmap="magma", label="std " + pp.SQ_NORM, title=_std_title(run, ls),
                                structural_zero=cz))
        pp.suptitle(fig, f"{_model(run)} — {_describe(run, ls)}", fontweight="bold")
        pp.cell_legend(fig, flags)
        return pp.to_png(fig)


def dominance_png(run: RunResult, ls: LayerStats, share: float = dom.DEFAULT_SHARE) -> bytes:
    """Left: ``max / sum`` per cell (cells with one sample hatched); right: each row's share of its
    largest sample, rows above ``share`` labelled with that sample_id."""
    s = ls.mean.shape[0]
    cell = np.where(ls.cell_count >= 2, ls.max_share, np.nan)
    with pp.style():
        fig, (a1, a2) = pp.new_figure(12.5, 5.6, 1, 2)
        pp.heatmap(fig, a1, cell, cmap="Reds", label="max / sum", log=False,
                   title="share of each cell's sum carried by its largest sample")
        a1.set_xlabel("input position j   (hatched: undefined — fewer than 2 samples or a zero sum)")
        i = np.arange(s)
        rs = np.nan_to_num(ls.row_share, nan=0.0)
        a2.bar(i, rs, color=np.where(rs > share, "C3", "C0"), width=0.8)
        a2.axhline(share, color="#555555", lw=1, ls="--", label=f"threshold {share:.0%}")
        for r in dom.dominated_rows(ls, share)[:12]:
            a2.annotate(f"#{r['sample_id']}", (r["i"], r["share"]), ha="center", va="bottom", fontsize=7,
                        rotation=90, xytext=(0, 2), textcoords="offset points")
        a2.set_ylim(0, 1.15)
        a2.set_xlabel("output position i")
        a2.set_ylabel(r"largest sample's $\Sigma_j A_{ij}$ / row total")
        a2.set_title("share of each row carried by one sample (labels: sample_id)")
        a2.legend(loc="upper left", frameon=False)
        pp.position_ticks(a2, s, y=False)
        pp.suptitle(fig, f"{_model(run)} — what drives a cell — {_describe(run, ls)}", fontweight="bold")
        return pp.to_png(fig)


def sample_png(run: RunResult, layer: int, a: np.ndarray, sample_id: int, text: str | None = None) -> bytes:
    """One sample's ``[n, n]`` map beside the dataset mean of the same cells."""
    n = a.shape[0]
    mean = run[layer].mean[:n, :n] if layer in run.layers else None
    with pp.style():
        fig, axes = pp.new_figure(12.5 if mean is not None else 6.8, 5.8, 1, 2 if mean is not None else 1)
        axes = np.atleast_1d(axes)
        cz = np.triu(np.ones((n, n), bool), k=1) if an.is_causal(np.asarray(a, float)) else None
        flags = [pp.heatmap(fig, axes[0], np.asarray(a, float), cmap="viridis", label=pp.SQ_NORM,
                            title=f"sample {sample_id}: $A_{{ij}}$", structural_zero=cz)]
        if mean is not None:
            flags.append(pp.heatmap(fig, axes[1], mean, cmap="viridis", label="mean " + pp.SQ_NORM,
                                    title="dataset mean (same cells)", structural_zero=cz))
        head = f"{_model(run)} — layer {layer} — sample {sample_id}"
        pp.suptitle(fig, head + (f"\n“{text}”" if text else ""), fontweight="bold")
        pp.cell_legend(fig, flags)
        return pp.to_png(fig)


def distance_png(run: RunResult, ls: LayerStats) -> bytes:
    from matplotlib.ticker import MaxNLocator

    causal = an.is_causal(ls.mean)
    prof = an.distance_profile(ls.mean, ls.var, ls.cell_count, causal_only=causal)
    rest = an.distance_profile(ls.mean, ls.var, ls.cell_count, causal_only=causal, skip_first=True)
    with pp.style():
        fig, ax = pp.new_figure(7.8, 4.6)
        if prof["d"].size:
            log = pp.band_plot(ax, prof["d"], prof["mean"], sd=prof["sd"], se=prof["se"], label="mean over cells",
                               log=pp.wants_log(np.concatenate([prof["mean"], rest["mean"]])))
            if rest["d"].size:
                ax.plot(rest["d"], rest["mean"], color="C1", lw=1.2, ls="--", label="without the first token (j ≥ 1)")
            fit = decay.layer_fit(ls)[0] if causal else None
            if fit is not None:  # fitted to the dashed line from r = 1 on (decay.py)
                rr = np.arange(int(fit.r.min()), int(fit.r.max()) + 1)
                ax.plot(rr, fit.predict(rr), color="C3", lw=1.2, ls=":",
                        label=rf"fit $\gamma+\beta(r+1)^{{-p}}$, p = {an.fmt(fit.p)} {fit.interval()}")
            if log:  # room for both lines (band floors stay clipped at the axis)
                ys = np.concatenate([prof["mean"], rest["mean"]])
                ys = ys[np.isfinite(ys) & (ys > 0)]
                ax.set_ylim(bottom=max(float(ys.min()) / 2, float(ys.max()) * 1e-12))
            ax.legend(loc="best", frameon=False)
        else:
            log = False
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("distance i − j (tokens; > 0: input before output)")
        ax.set_ylabel("mean " + pp.SQ_NORM + (" (log)" if log else ""))
        ax.set_title(f"{_model(run)} — sensitivity vs distance\n{_describe(run, ls)}")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        return pp.to_png(fig)


def sink_png(run: RunResult, ls: LayerStats) -> bytes:
    s = ls.mean.shape[0]
    i = np.arange(s)
    col, diag = ls.mean[:, 0], np.diag(ls.mean)
    sd = ls.std[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(ls.var[:, 0] / ls.cell_count[:, 0])
        total = np.nansum(ls.mean, axis=1)
        share = np.where(total > 0, col / total, np.nan)
    with pp.style():
        fig, (a1, a2) = pp.new_figure(12.5, 4.6, 1, 2)
        both = np.concatenate([col, diag])
        log = pp.band_plot(a1, i, col, sd=sd, se=se, label=r"first token $A_{i0}$", log=pp.wants_log(both))
        a1.plot(i, diag, color="C1", lw=1.2, ls="--", label=r"diagonal $A_{ii}$ (reference)")
        pos = both[np.isfinite(both) & (both > 0)]
        if pos.size:  # both lines in view (the band may leave it)
            top = max(float(pos.max()), float(np.nanmax(np.where(np.isfinite(col + sd), col + sd, 0))))
            a1.set_ylim((float(pos.min()) / 2, top * 1.6) if log else (min(0.0, a1.get_ylim()[0]), top * 1.08))
        a1.legend(loc="best", frameon=False)
        a1.set_xlabel("output position i")
        a1.set_ylabel("mean " + pp.SQ_NORM + (" (log)" if log else ""))
        a1.set_title("sensitivity to the first token")
        a2.plot(i[1:], share[1:], color="C2", lw=1.6, marker="o" if s <= 40 else None, ms=3.5)
        peak = float(np.nanmax(share[1:])) if s > 1 and np.isfinite(share[1:]).any() else 1.0
        a2.set_ylim(0, min(1.02, max(peak * 1.25, 0.05)))
        a2.set_xlabel("output position i")
        a2.set_ylabel(r"$A_{i0} \,/\, \Sigma_j A_{ij}$")
        a2.set_title("share of the row's sensitivity on the first token")
        a2.grid(True, color="#e6e6e6", lw=0.7)
        for ax in (a1, a2):
            pp.position_ticks(ax, s, y=False)
        pp.suptitle(fig, f"{_model(run)} — {_describe(run, ls)}", fontweight="bold")
        return pp.to_png(fig)


SUMMARY_PANELS = (
    (("diag", r"mean diagonal $A_{ii}$"), ("offdiag", r"mean off-diagonal $A_{ij}$, $j \neq i$")),
    (("diag_share", "diagonal share"), ("sink_share", "first-token (sink) share")),
    (("distance", "weighted mean distance |i − j|"),),
    (("row_total", r"mean row total $\Sigma_j A_{ij}$"),),
)
PANEL_TITLES = ("mean sensitivity", "share of each row's total", "how far back outputs look (tokens)",
                "total sensitivity per output position")


def summary_png(series: Sequence[tuple[str, dict[int, dict]]], title: str) -> bytes:
    """Per-layer summaries (2×2 panels). ``series``: ``[(label, {layer: layer_summary})]``. With one
    series colours tell the metrics apart; with several each series has a colour and the line style
    tells the metrics apart (solid: first metric of the panel, dashed: second)."""
    from matplotlib.ticker import MaxNLocator

    many = len(series) > 1
    with pp.style():
        fig, axes = pp.new_figure(12.0, 7.6, 2, 2)
        for p, (ax, metrics) in enumerate(zip(axes.ravel(), SUMMARY_PANELS)):
            for si, (label, per_layer) in enumerate(series):
                layers = sorted(per_layer)
                for mi, (key, name) in enumerate(metrics):
                    y = np.array([per_layer[L][key] for L in layers], float)
                    ax.plot(layers, y, marker="o", ms=4, lw=1.5, ls=("-", "--")[mi % 2],
                            color=f"C{si % 10}" if many else f"C{mi}",
                            label=(label if mi == 0 else None) if many else name)
            vals = np.array([s[k] for _, pl in series for s in pl.values() for k, _ in metrics], float)
            if p in (0, 3) and pp.wants_log(vals, 1.5):
                ax.set_yscale("log")
            if p == 1:
                ax.set_ylim(0, 1.02)
            sub = "  (solid: " + metrics[0][1] + ", dashed: " + metrics[1][1] + ")" if many and len(metrics) > 1 else ""
            ax.set_title(PANEL_TITLES[p] + ("\n" + sub.strip() if sub else ""))
            ax.set_xlabel("layer")
            ax.set_ylabel(metrics[0][1] if len(metrics) == 1 else "")
            ax.grid(True, color="#e6e6e6", lw=0.7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if (not many and len(metrics) > 1) or (many and p == 0):
                ax.legend(loc="best", frameon=False, fontsize=8 if len(series) <= 6 else 6.5)
        pp.suptitle(fig, title, fontweight="bold")
        return pp.to_png(fig)


def layer_summaries(run: RunResult) -> dict[int, dict]:
    """``analysis.layer_summary`` per layer plus the decay law's ``decay_p``, ``decay_p_lo``,
    ``decay_p_hi`` and ``decay`` (a table cell; ``raysens.report.decay``)."""
    fits = decay.run_fits(run)
    return {L: {**an.layer_summary(ls.mean), **decay.summary_fields(fits[L][0])} for L, ls in sorted(run.layers.items())}


def _layer_pngs(run: RunResult, layers) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for L in layers:
        ls = run.layers[L]
        out[f"layer_{L:03d}_heatmap.png"] = heatmap_png(run, ls)
        out[f"layer_{L:03d}_distance.png"] = distance_png(run, ls)
        out[f"layer_{L:03d}_sink.png"] = sink_png(run, ls)
        if dom.available(ls):
            out[f"layer_{L:03d}_dominance.png"] = dominance_png(run, ls)
    return out


def _layer_pngs_of(run_dir: str, layers) -> dict[str, bytes]:
    """In a worker process: the run loaded once, then its share of the layers."""
    return _layer_pngs(load_run(run_dir), layers)


def _workers(n_layers: int, workers: int | None) -> int:
    if workers is None:  # each worker pays ~2 s of imports: worth it from ~4 layers on
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    return max(1, min(int(workers), n_layers // 4))


def render_run_plots(run: RunLike, workers: int | None = None) -> dict[str, bytes]:
    """All plots of one run as ``{file name: PNG bytes}`` (in display order). A run directory with
    many layers is rendered by ``workers`` processes (default: the usable cores, at most 8; each
    renders a contiguous share of the layers; the bytes are those of one process)."""
    path = None if isinstance(run, RunResult) else run
    run = _load(run)
    layers = sorted(run.layers)
    n = _workers(len(layers), workers) if path is not None else 1
    if n > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        shares = [layers[i * len(layers) // n:(i + 1) * len(layers) // n] for i in range(n)]
        with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
            out = {}
            for part in pool.map(_layer_pngs_of, [path] * n, shares):
                out.update(part)
    else:
        out = _layer_pngs(run, layers)
    if run.layers:
        f = an.run_facts(run.manifest, run.layers)
        out["layers_summary.png"] = summary_png([(_model(run), layer_summaries(run))],
                                                f"{_model(run)} — per-layer summary · {f['estimator']} · "
                                                f"{an.fmt(f['samples'])} samples")
        fits = decay.run_fits(run)
        if any(fit is not None for fit, _ in fits.values()):
            from .decay_plot import decay_png

            out["decay.png"] = decay_png(fits, f"{_model(run)} — decay with distance · {f['estimator']} · "
                                               f"{an.fmt(f['samples'])} samples")
        if isinstance(run.manifest.get("paired"), dict):  # a paired run: the differences (paired.py)
            from .paired import render_paired_plots

            out.update(render_paired_plots(run))
    return out


def write_pngs(out_dir: str, pngs: dict[str, bytes]) -> list[str]:
    """Write ``{name: bytes}`` under ``out_dir`` (path or URI); returns the written paths."""
    fs, base = resolve(out_dir)
    paths = []
    for name, data in pngs.items():
        write_bytes(fs, posixpath.join(base, name), data)
        paths.append(posixpath.join(str(out_dir).rstrip("/"), name))
    return paths


def write_run_plots(run_dir: RunLike, out_dir: str | None = None) -> list[str]:
    """Render every plot of a run into ``<run>/plots/`` (or ``out_dir``); returns the PNG paths."""
    run = _load(run_dir)
    target = out_dir if out_dir is not None else posixpath.join(str(run.path).rstrip("/"), "plots")
    return write_pngs(target, render_run_plots(run))


# ---------------------------------------------------------------------------- two runs / a sweep
def _name(run: RunResult) -> str:
    return posixpath.basename(str(run.path).rstrip("/")) or str(run.path)


def compare_png(run_a: RunResult, run_b: RunResult, layer: int, d: dict | None = None) -> bytes:
    d = d or an.difference(run_a[layer].mean, run_b[layer].mean)
    both = np.concatenate([np.abs(d["a"]).ravel(), np.abs(d["b"]).ravel()])
    with pp.style():
        fig, (a1, a2) = pp.new_figure(12.5, 5.8, 1, 2)
        pp.diverging(fig, a1, d["diff"], cmap="RdBu_r", label="B − A  of mean " + pp.SQ_NORM,
                     title=f"difference B − A (max |Δ| = {an.fmt(d['max_abs'])})", symlog=pp.wants_log(both, 3))
        pp.diverging(fig, a2, d["log_ratio"], cmap="PuOr_r", label="log10(B / A)",
                     title=r"log-ratio  ($\Vert B-A\Vert_F\,/\,\Vert A\Vert_F$ = " + an.fmt(d["rel_fro"]) + ")")
        pp.suptitle(fig, f"layer {layer} — A: {_name(run_a)} ({_model(run_a)}, {run_a[layer].count:,} samples)"
                     f"   vs   B: {_name(run_b)} ({_model(run_b)}, {run_b[layer].count:,} samples)", fontweight="bold")
        pp.cell_legend(fig, [{"zero": False, "nan": bool(np.isnan(d["diff"]).any())}])
        return pp.to_png(fig)


def render_compare_plots(run_a: RunLike, run_b: RunLike) -> dict[str, bytes]:
    a, b = _load(run_a), _load(run_b)
    return {f"compare_layer_{L:03d}.png": compare_png(a, b, L) for L in sorted(set(a.layers) & set(b.layers))}


def write_compare_plots(run_a: RunLike, run_b: RunLike, out_dir: str) -> list[str]:
    """``compare_layer_NNN.png`` for every layer both runs have, written under ``out_dir``."""
    return write_pngs(out_dir, render_compare_plots(run_a, run_b))


def sweep_summary_png(runs: Sequence[tuple[str, RunResult]]) -> bytes:
    """Per-layer summaries of several runs on shared axes (one colour per run)."""
    return summary_png([(label, layer_summaries(r)) for label, r in runs if r.layers],
                       f"sweep — per-layer summary of {len(runs)} runs")
