"""What a ``raysens report`` contains, as :class:`raysens.report.render.Doc` blocks.

Why this module is long: every section of a report, in reading order; each helper is short and used
by one section.
"""

from __future__ import annotations

import datetime as _dt
import posixpath
import re
from typing import Sequence

from . import analysis as an
from . import decay
from . import differences as dm
from . import dominance as dom
from . import paired as pr
from . import plots
from . import samples_needed as prec
from .render import Doc
from ..store.results import LayerStats, RunResult
from ..corpus.texts import sample_texts, snippet

ESTIMATOR_NOTES = {
    "exact": "exact: A_ij = ‖J_ij‖_F² computed exactly (one VJP per output unit); no estimator noise.",
    "hutchinson": "hutchinson: unbiased estimate (1/K) Σ_k ‖v_kᵀ J_ij‖² with E[v vᵀ] = I. The K probes add "
                  "noise; its share of the standard error is the 'probe part' below, and the dataset variance "
                  "is reported raw and corrected (raw − mean probe variance).",
    "projection": "projection: ‖uᵀ J_ij‖² with u = 1/√H · 1, the quantity of the older tool. It is NOT the "
                  "Frobenius norm ‖J_ij‖_F² (≈ 90% relative error on MiniLM-L6); use it only to reproduce old numbers.",
}
K1_NOTE = ("K = 1: with one probe per sample the probe noise cannot be separated from the variation across "
           "samples. The variance, the std heatmap and the standard errors include both, in unknown shares, and "
           "the corrected variance equals the raw one; rerun with sensitivity.num_probes ≥ 2 to measure it.")
SUMMARY_COLS = ["mean diagonal", "mean off-diagonal", "diagonal share", "sink share", "mean distance", "row total",
                "decay p (95% interval)"]
SUMMARY_KEYS = ["diag", "offdiag", "diag_share", "sink_share", "distance", "row_total", "decay"]
TARGET_SE = 0.05  # the report's default target relative SE (raysens report --target-se)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "run"


def _overview(doc: Doc, run: RunResult) -> None:
    f = an.run_facts(run.manifest, run.layers)
    model = run.manifest.get("model") or {}
    samples = run.manifest.get("samples") or {}
    est = f["estimator"]
    plans = an.layer_plans(run.manifest)
    if f["estimator"] == "hutchinson" and plans:
        est += (" (planned per layer: " + ", ".join(f"{L} {p.get('mode')} K={p.get('num_probes')}" for L, p in
                                                    sorted(plans.items())) + (f"; {f['probe']}" if f["probe"] else "") + ")")
    elif f["estimator"] == "hutchinson":
        est += f" (K = {f['num_probes']} probes" + (f", {f['probe']}" if f["probe"] else "") + ")"
    pairs = [("model", f["model"]), ("model class", model.get("class")), ("model type", model.get("model_type")),
             ("hidden layers", model.get("num_hidden_layers")), ("hidden size", model.get("hidden_size")),
             ("parameters", model.get("parameters")), ("dataset", f["dataset"]), ("estimator", est),
             ("seed", f["seed"]), ("max_seq_len", f["max_seq_len"]), ("seq len (observed)", f["seq_len"]),
             ("layers", ", ".join(map(str, sorted(run.layers)))), ("status", run.manifest.get("status"))]
    pairs += [(f"samples {k}", v) for k, v in an.sample_lines(samples)] or [("samples", f["samples"])]
    pairs += _plan_pairs(run.manifest.get("plan"))
    doc.kv([(k, v) for k, v in pairs if v is not None])
    note = ESTIMATOR_NOTES.get(f["estimator"])
    if note:
        doc.p(note, "note" if f["estimator"] == "projection" else "")
    unknown = [L for L in sorted(run.layers) if not an.probe_noise_known(f, an.layer_probes(f, plans, L))]
    if unknown:
        doc.p((f"Layer{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))}: " if plans else "") + K1_NOTE,
              "note")


def _estimator_cell(estimator: str, manifest: dict) -> str:
    """A sweep overview's estimator: ``hutchinson, planned: 1 forward K=2; 2 reverse K=3`` for a
    planned (or hand-written ``layer_plan``) point, the estimator alone otherwise."""
    plans = an.layer_plans(manifest)
    if estimator != "hutchinson" or not plans:
        return estimator
    return (f"{estimator}, planned: "
            + "; ".join(f"{L} {p.get('mode')} K={p.get('num_probes')}" for L, p in sorted(plans.items())))


def _plan_pairs(plan) -> list[tuple[str, object]]:
    """The planner's objective and outcome (manifest ``plan``, docs/DESIGN.md §1.11) as overview rows."""
    if not isinstance(plan, dict):
        return []
    cost = plan.get("cost") or {}
    what = (f"relative SE ≤ {an.fmt(plan.get('target_rel_se'))}" if plan.get("objective") == "target"
            else f"cost ≤ {an.fmt(plan.get('budget'))}× a mode-auto K=1 run")
    pilot = plan.get("pilot") or {}
    return [("plan", f"{what} ({plan.get('target_error')} error, median over cells); "
                     f"{'met' if plan.get('feasible') else 'NOT reachable: the most precise plan instead'}"),
            ("plan cost", f"{an.fmt(cost.get('relative_to_auto_k1'))}× a mode-auto K=1 run"),
            ("plan worst predicted relative SE", plan.get("worst_predicted")),
            ("plan pilot", f"{len(pilot.get('sample_ids') or [])} samples, K={pilot.get('probes')} in both modes, "
                           f"{an.fmt(pilot.get('wall_s'))} s") if pilot else ("plan pilot", None)]


def _precision(doc: Doc, run: RunResult, level: int) -> None:
    doc.h(level, "Sample counts and standard errors")
    doc.p("Per layer: samples folded in, how many cells received data, and the median (over cells) standard "
          "error of a cell's dataset mean, sqrt(var / n), absolute and relative to the cell mean. The probe part "
          "is sqrt(mean probe variance / n): the share of that error due to the estimator's random probes.", "muted")
    rows = []
    f = an.run_facts(run.manifest, run.layers)
    plans = an.layer_plans(run.manifest)
    predicted = any("predicted_rel_se" in p for p in plans.values())
    if plans:
        doc.p("Planned run (docs/DESIGN.md §1.11): each layer's mode and K are its own; 'predicted' is the "
              "planner's figure from the pilot for the planned sample count, the relative columns beside it are "
              "what the run achieved.", "muted")
    for L, ls in sorted(run.layers.items()):
        known = an.probe_noise_known(f, an.layer_probes(f, plans, L))
        se = an.standard_errors(ls.mean, ls.var, ls.probe_noise, ls.cell_count, known)
        cc = ls.cell_count[ls.cell_count > 0]
        p = plans.get(L) or {}
        pct = (lambda x: f"{an.fmt(x * 100, 2)}%" if x is not None else "–")
        probe = ([se["probe_se"], pct(se["rel_probe_se"])] + ([pct(p.get("predicted_rel_probe_se"))] if predicted else [])
                 + [se["probe_se_sample"]] if known else
                 [an.PROBE_UNKNOWN, "unknown"] + ([pct(p.get("predicted_rel_probe_se"))] if predicted else []) + ["unknown"])
        rows.append(([L, p.get("mode", "?"), p.get("num_probes", "?")] if plans else [L])
                    + [ls.count, f"{cc.size} / {ls.cell_count.size}", int(cc.min()) if cc.size else 0,
                       int(cc.max()) if cc.size else 0, se["se"], pct(se["rel_se"])]
                    + ([pct(p.get("predicted_rel_se"))] if predicted else []) + probe)
    doc.table((["layer", "mode", "K"] if plans else ["layer"])
              + ["samples", "cells with data", "min n", "max n", "SE of mean", "relative"]
              + (["predicted relative SE"] if predicted else []) + ["probe part", "relative"]
              + (["predicted probe relative"] if predicted else []) + ["probe SE, one sample"], rows)


def _claims(doc: Doc, run: RunResult, level: int, target: float) -> None:
    """Samples a claim needs (``raysens.report.samples_needed``): achieved relative SE and samples for ``target``."""
    doc.h(level, "Samples a claim needs")
    doc.p(f"Target: relative SE {an.fmt(target * 100, 3)}% per cell. " + prec.HELP[0].upper() + prec.HELP[1:]
          + ". 'Without probe noise': what more probes per sample (or an exact estimator) would leave.", "muted")
    rows = []
    for L, p in prec.run_precision(run, target).items():
        rows.append([L, p["count"], p["cells"], prec.parts(p, "median"), prec.parts(p, "p90"),
                     prec.needed(p, "median"), prec.needed(p, "p90"),
                     ", ".join(an.fmt(p[f"n_needed_data_{q}"]) if p[f"n_needed_data_{q}"] == p[f"n_needed_data_{q}"]
                               else "unknown" for q in ("median", "p90"))])
    doc.table(["layer", "samples", "cells", "median relative SE", "p90 relative SE", "samples for median",
               "samples for p90", "without probe noise (median, p90)"], rows)


DECAY_HELP = ("G(r): the mean of E[A_ij] over the cells at distance r = i − j ≥ 1 without the first-token column; "
              "weighted least squares with G's standard errors from the cells' var / n (cells at one distance taken "
              "as fully correlated: the widest interval); p's interval from the profile likelihood, widened by "
              "χ²/dof when that exceeds 1 (docs/DESIGN.md, decay laws).")


def _decay(doc: Doc, run: RunResult, level: int, pngs: dict, prefix: str) -> None:
    """The decay law per layer: plot and table (causal runs; ``raysens.report.decay``)."""
    fits = decay.run_fits(run)
    if not any(an.is_causal(ls.mean) for ls in run.layers.values()):
        return
    doc.h(level, "Decay with distance")
    if "decay.png" in pngs:
        doc.img(prefix + "decay.png", pngs["decay.png"], "decay exponent p per layer and the fitted laws")
    doc.p(DECAY_HELP, "muted")
    rows = [[L, an.fmt(f.p), f.interval(), f.gamma, f.beta, f.red_chi2, f"{an.fmt(f.rel_rms * 100, 2)}%",
             f"{int(f.r.min())}–{int(f.r.max())}", ""] if f is not None else [L, "–", "–", "–", "–", "–", "–", "–", why]
            for L, (f, why) in fits.items()]
    doc.table(["layer", "p", "95% interval", "γ", "β", "χ²/dof", "rel. RMS residual", "r", "no fit because"], rows)


PAIRED_HELP = ("Both sides were computed on the same tokens with the same probes; per cell the run kept the "
               "statistics of the per-sample difference D = A(a) − A(b). A cell 'changed' when the two-sided t-test "
               "of mean D = 0 (n − 1 degrees of freedom) survives Benjamini–Hochberg at the run's false-discovery rate "
               "over the layer's tested cells (cells with at least 2 pairs and a D not identically 0). Paired SE: "
               "sqrt(var(D) / n); unpaired SE at equal cost: sqrt(var_a / n + var_b / n), what two independent runs "
               "of the same size would give (medians over the tested cells). a / b: exp of the mean of ln A(a) − "
               "ln A(b) over the cells (where both > 0). Δp = p_a − p_b: both sides' decay laws fitted at once with the "
               "covariance of their distance profiles that the paired cells measured, interval from the profile "
               "likelihood in Δp (raysens.report.differences.joint_delta_p; where that is not possible, each side's "
               "half-widths in quadrature, which ignores the sides' positive correlation and is wider).")


def _paired(doc: Doc, run: RunResult, level: int, pngs: dict, prefix: str, target: float) -> None:
    """A paired run's differences (issue 29): per-layer sentences and table, Δp, the heatmaps, and the
    samples a claim about the difference needs (``paired.py``, ``differences.py``)."""
    v = pr.view(run)
    if v is None:
        return
    a, b = v.labels
    doc.h(level, f"Paired differences: {a} − {b}")
    doc.kv([("side a", pr._side_text(v.info.get("a"))), ("side b", pr._side_text(v.info.get("b"))),
            ("false-discovery rate", f"{an.fmt(v.fdr * 100)} % per layer (Benjamini–Hochberg)")]
           + ([("layer map", ", ".join(f"a {k} ↔ b {w}" for k, w in v.info["layer_map"].items()))]
              if v.info.get("layer_map") else []))
    doc.p(PAIRED_HELP, "muted")
    if v.info.get("common_probes") is False:
        doc.p(pr.NOT_COMMON[0].upper() + pr.NOT_COMMON[1:] + ".", "note")
    layers = []
    for L in v.layers:
        try:
            layers.append((L, v.summary(L)))
        except (OSError, ValueError, KeyError) as e:
            doc.p(f"Layer {L}: no difference statistics ({e}).", "note")
    if not layers:
        return
    if "paired_summary.png" in pngs:
        doc.img(prefix + "paired_summary.png", pngs["paired_summary.png"],
                "per layer: share of the cells changed, paired / unpaired SE, Δp")
    for _, s in layers:
        doc.p(s.sentence(v.labels) + ".")
    doc.table(["layer", "pairs", "cells tested", "changed", "up (a > b)", "down (a < b)", "share changed",
               "median paired SE", "median unpaired SE", "ratio", "a / b over changed", "a / b over tested"],
              [[L, s.pairs, s.tested, s.changed, s.up, s.down, f"{an.fmt(s.share * 100, 3)}%", s.median_se_paired,
                s.median_se_unpaired, s.se_ratio, s.times_changed, s.times_tested] for L, s in layers])
    if v.causal():
        rows = []
        for L, _ in layers:
            dec = v.decay(L)
            (fa, wa), (fb, wb), (dp, why) = dec["a"], dec["b"], dec["dp"]
            rows.append([L, decay.cell(fa), decay.cell(fb), an.fmt(dp.dp) if dp else "–", dp.interval() if dp else "–",
                         ("yes" if dp.excludes_zero() else "no") if dp else "–", why])
        doc.h(level + 1, "Decay exponent per side and Δp")
        doc.table(["layer", f"p ({a})", f"p ({b})", "Δp", "95% interval", "excludes 0", "no Δp because"], rows)
    doc.h(level + 1, "Samples a claim about the difference needs")
    doc.p(f"Relative SE of a cell's mean difference, se(D̄) / |D̄|, median and 90th percentile over the changed cells "
          f"(all tested cells where none changed), and the pairs that bring it to {an.fmt(target * 100, 3)}%: "
          "n · (relative SE / target)².", "muted")
    rows = []
    for L, s in layers:
        p = dm.difference_precision(v.diff(L), target, v.fdr)
        rows.append([L, p["over"], p["cells"], f"{an.fmt(p['rel_median'] * 100, 3)}%", f"{an.fmt(p['rel_p90'] * 100, 3)}%",
                     p["n_needed_median"], p["n_needed_p90"], p["count"]])
    doc.table(["layer", "over", "cells", "median relative SE", "p90 relative SE", "pairs for median",
               "pairs for p90", "pairs in the run"], rows)
    for L, s in layers:
        name = f"layer_{L:03d}_paired.png"
        if name in pngs:
            doc.h(level + 1, f"Layer {L}: {a} − {b}")
            doc.img(prefix + name, pngs[name], f"layer {L}: mean difference {a} − {b}, cells not changed at FDR "
                                               f"{an.fmt(s.fdr * 100)} % grey; paired / unpaired SE per cell")
            if s.top:
                doc.table(["i", "j", f"mean {a} − {b}", "SE", "q"], [list(t) for t in s.top])


def _summary_table(doc: Doc, summaries: dict[int, dict], prefix: list | None = None, head: list | None = None) -> None:
    rows = [(prefix or []) + [L] + [s[k] for k in SUMMARY_KEYS] for L, s in sorted(summaries.items())]
    doc.table((head or []) + ["layer"] + SUMMARY_COLS, rows)


SUMMARY_HELP = ("Averages over output positions i (i ≥ 1 for causal models: row 0 sees only itself). "
                "diagonal / sink share: A_ii / Σ_j A_ij and A_i0 / Σ_j A_ij; mean distance: the sensitivity-"
                "weighted mean |i − j| of a row; row total: Σ_j A_ij; off-diagonal cells are those the model can "
                "see (j < i for causal models).")


DOMINANCE_HELP = ("A cell is dominated when its largest sample carries more than {share:.0%} of the cell's sum "
                  "over samples (cells reached by at least two samples); a row when one sample's row total "
                  "Σ_j A_ij is more than {share:.0%} of the row's total. The mean of such a cell or row is "
                  "essentially that sample's value: compare it with the median, which one sample cannot move. "
                  "`raysens show RUN --sample ID` plots one sample's map.")


def _dominance(doc: Doc, run: RunResult, ls: LayerStats, level: int, share: float, texts: dict) -> None:
    """The "what drives a cell" view of one layer: dominated rows and cells with their samples' texts."""
    L = ls.layer
    doc.h(level + 1, f"What drives layer {L}: dominated rows and cells")
    sm = dom.summary(ls, share)
    doc.p(f"{sm['rows']} of {ls.mean.shape[0]} rows and {sm['cells']} of {sm['eligible']} cells (n ≥ 2, positive "
          f"sum) are dominated by one sample (share > {share:.0%}); median share of a cell's largest sample: "
          f"{an.fmt(sm['median_share'] * 100, 3)}% (1/n = {an.fmt(100 / max(ls.count, 1), 3)}% when all samples "
          "weigh the same).")
    doc.p(DOMINANCE_HELP.format(share=share), "muted")
    rows = dom.dominated_rows(ls, share)
    if rows:
        doc.table(["row i", "share of row", "sample_id", "sample's row total", "row total", "text (first words)"],
                  [[r["i"], f"{r['share']:.1%}", r["sample_id"], r["row_max"], r["row_total"],
                    snippet(texts.get(r["sample_id"])) if texts else "–"] for r in rows[:15]])
    cells = dom.dominated_cells(ls, share, 10)
    if cells:
        doc.table(["i", "j", "share", "sample_id", "max", "mean", "median", "n", "text (first words)"],
                  [[c["i"], c["j"], f"{c['share']:.1%}", c["sample_id"], c["max"], c["mean"], c["median"], c["n"],
                    snippet(texts.get(c["sample_id"])) if texts else "–"] for c in cells])
    if not rows and not cells:
        doc.p(f"No row or cell of layer {L} is dominated by one sample at {share:.0%}.")


def _run_body(doc: Doc, run: RunResult, level: int, prefix: str, share: float = dom.DEFAULT_SHARE,
              target: float = TARGET_SE) -> None:
    """Everything about one run, headings starting at ``level``; images under ``prefix``."""
    pngs = plots.render_run_plots(run)
    ids = [i for ls in run.layers.values() for i in dom.culprits(ls, share)]
    texts = sample_texts(run.manifest, ids) if ids else {}
    doc.h(level, "Overview")
    _overview(doc, run)
    _precision(doc, run, level)
    _claims(doc, run, level, target)
    if "layers_summary.png" in pngs:
        doc.h(level, "Across layers")
        doc.img(prefix + "layers_summary.png", pngs["layers_summary.png"], "per-layer summaries")
        doc.p(SUMMARY_HELP, "muted")
        _summary_table(doc, plots.layer_summaries(run))
    _decay(doc, run, level, pngs, prefix)
    _paired(doc, run, level, pngs, prefix, target)
    for L, ls in sorted(run.layers.items()):
        doc.h(level, f"Layer {L}")
        doc.img(prefix + f"layer_{L:03d}_heatmap.png", pngs[f"layer_{L:03d}_heatmap.png"],
                f"layer {L}: mean{', median' if ls.median is not None else ''} and std of ‖J_ij‖_F² over "
                f"{ls.count:,} samples (rows: output position i, columns: input position j)")
        doc.img(prefix + f"layer_{L:03d}_distance.png", pngs[f"layer_{L:03d}_distance.png"],
                f"layer {L}: sensitivity against distance i − j")
        doc.img(prefix + f"layer_{L:03d}_sink.png", pngs[f"layer_{L:03d}_sink.png"],
                f"layer {L}: sensitivity to the first token (column j = 0)")
        if f"layer_{L:03d}_dominance.png" in pngs:
            doc.img(prefix + f"layer_{L:03d}_dominance.png", pngs[f"layer_{L:03d}_dominance.png"],
                    f"layer {L}: share of each cell and row carried by its largest sample")
            _dominance(doc, run, ls, level, share, texts)
        doc.h(level + 1, f"Top 10 cells, layer {L}")
        doc.table(["rank", "i", "j", "mean", "std", "n"],
                  [[r, i, j, mu, sd, int(ls.cell_count[i, j])]
                   for r, (i, j, mu, sd) in enumerate(an.top_cells(ls.mean, ls.std, 10), 1)])
    _config(doc, run, level)


def _config(doc: Doc, run: RunResult, level: int) -> None:
    m = run.manifest
    timings = m.get("timings") or {}
    if timings:
        doc.h(level, "Timings")
        doc.kv([(k, f"{an.fmt(v)}" + (" s" if k.endswith("_s") and isinstance(v, (int, float)) else ""))
                for k, v in an.flatten(timings)])
    doc.h(level, "Run configuration")
    cfg = an.flatten(m.get("config") or {})
    doc.kv([(k, v) for k, v in cfg] or [("config", "(not recorded in the manifest)")])
    if m.get("versions"):
        doc.h(level, "Versions")
        doc.kv(an.flatten(m["versions"]))
    other = [(f"{sec}.{k}", v) for sec in ("corpus", "backend", "units") if isinstance(m.get(sec), dict)
             for k, v in an.sample_lines(m[sec])]
    other += [(k, m[k]) for k in ("fingerprint", "format") if m.get(k) is not None]
    if other:
        doc.h(level, "Execution")
        doc.kv(other)


def sweep_overview(doc: Doc, labels: Sequence[str], runs: Sequence[RunResult]) -> None:
    """The sweep report's first table: one row per run (a planned run's estimator names its plan)."""
    doc.h(2, "Sweep overview")
    rows = []
    for label, r in zip(labels, runs):
        f = an.run_facts(r.manifest, r.layers)
        rows.append([label, f["model"], ", ".join(map(str, sorted(r.layers))), f["seq_len"], f["dataset"],
                     _estimator_cell(f["estimator"], r.manifest), f["samples"],
                     f["skipped"] if not isinstance(f["skipped"], (dict, list)) else "", f["wall_s"], f["samples_per_s"]])
    doc.table(["run", "model", "layers", "seq len", "dataset", "estimator", "samples", "skipped", "wall s",
               "samples/s"], rows)


def build_report(kind: str, root: str, runs: Sequence[RunResult], share: float = dom.DEFAULT_SHARE,
                 target: float = TARGET_SE) -> Doc:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    if kind == "run":
        run = runs[0]
        f = an.run_facts(run.manifest, run.layers)
        doc = Doc(f"raysens report — {f['model']}")
        doc.p(f"run directory {run.path} · generated {stamp}", "muted")
        _run_body(doc, run, 2, "", share, target)
        return doc
    doc = Doc(f"raysens sweep report — {posixpath.basename(root) or root}")
    doc.p(f"sweep directory {root} · {len(runs)} runs · generated {stamp}", "muted")
    labels = [posixpath.relpath(str(r.path).rstrip("/"), root) if str(r.path).startswith(root) else str(r.path)
              for r in runs]
    sweep_overview(doc, labels, runs)
    doc.h(2, "Per-layer summaries across the sweep")
    doc.img("sweep_summary.png", plots.sweep_summary_png(list(zip(labels, runs))),
            "per-layer summaries of every run (one colour per run)")
    doc.p(SUMMARY_HELP, "muted")
    srows = []
    for label, r in zip(labels, runs):
        f = an.run_facts(r.manifest, r.layers)
        for L, s in sorted(plots.layer_summaries(r).items()):
            srows.append([label, f["model"], L, f["seq_len"], f["dataset"], f["estimator"], r[L].count]
                         + [s[k] for k in SUMMARY_KEYS])
    doc.table(["run", "model", "layer", "seq len", "dataset", "estimator", "samples"] + SUMMARY_COLS, srows)
    for label, r in zip(labels, runs):
        doc.h(2, f"Run {label}")
        _run_body(doc, r, 3, _slug(label) + "/", share, target)
    return doc

