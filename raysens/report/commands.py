"""``raysens report`` / ``raysens show`` / ``raysens compare``: look at run directories.

- ``raysens report RUN_OR_SWEEP_DIR [--out DIR] [--target-se 0.05]`` writes ``report.html`` (self-contained, PNGs
  embedded) and ``report.md`` with the PNG files beside it. A sweep directory is one that holds
  several run directories (each with a ``manifest.json``) up to two levels down.
- ``raysens show RUN_DIR`` prints counts, skipped samples, the top sensitivities per layer, the rows
  most dominated by one sample (with their sample_ids), the decay law's exponent p per layer
  (``decay.py``), the estimator and timings; with ``--target-se REL`` also the achieved relative SE
  per layer and the samples needed to reach REL (``samples_needed.py``). On a paired run (issue 29) it then
  prints the sides and per layer the cells changed at the run's FDR, the paired vs unpaired SE, the largest
  changes, p per side with Δp, and with ``--target-se`` the pairs a claim about the difference needs
  (``paired.py``, ``differences.py``).
  ``raysens show RUN_DIR --sample ID`` plots one sample's map (from the per-sample export, or
  recomputed by ``raysens.run.sample``, which the CLI hands in: this package does not import torch).
- ``raysens compare RUN_A RUN_B [--out DIR]`` writes B − A difference heatmaps and prints the largest
  differences, saying once that they are unpaired (a paired run gives them error bars and a test).

Each ``main_*`` takes an argv list and returns an exit code (0 ok, 1 bad input, 2 usage).

Why this module is long: the three commands (report, show, compare) share argument parsing, run
discovery and error handling; each command is short.
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from typing import Sequence

import numpy as np
import pyarrow.fs as pafs

from . import analysis as an
from . import decay
from . import dominance as dom
from . import paired
from . import samples_needed
from .content import TARGET_SE, build_report
from .render import to_html, to_markdown
from ..store.results import RunResult, exists, load_run, resolve, write_bytes
from ..errors import RaysensError
from ..corpus.texts import sample_texts, snippet


class CommandError(RaysensError):
    """A user-facing error; the message names the problem."""


def _parse(prog: str, argv: Sequence[str] | None, build) -> argparse.Namespace | int:
    parser = argparse.ArgumentParser(prog=f"raysens {prog}", description=build.__doc__)
    build(parser)
    try:
        return parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:  # --help (0) or a usage error (2): argparse already printed why
        return int(e.code or 0)


def _fail(cmd: str, msg: str) -> int:
    print(f"raysens {cmd}: error: {msg}", file=sys.stderr)
    return 1


NO_MATPLOTLIB = ("plots need matplotlib, which is not installed: pip install 'raysens[plots]' "
                 "(or pip install matplotlib)")


def _is_missing_matplotlib(exc: ImportError) -> bool:
    return (exc.name or "").split(".")[0] == "matplotlib" or "matplotlib" in str(exc)


def _failed(cmd: str, exc: Exception) -> int:
    """Exit status 1 and one line for a ``CommandError`` or a missing matplotlib; anything else is raised."""
    if isinstance(exc, CommandError):
        return _fail(cmd, str(exc))
    if isinstance(exc, ImportError) and _is_missing_matplotlib(exc):
        return _fail(cmd, NO_MATPLOTLIB)
    raise exc


def find_runs(path: str, cmd: str = "report", depth: int = 2) -> tuple[str, list[str]]:
    """``("run", [path])`` for a run directory, ``("sweep", [run dirs…])`` for a directory holding
    run directories (up to ``depth`` levels down); raises :class:`CommandError` otherwise."""
    fs, base = resolve(path)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise CommandError(f"{path!r} does not exist")
    if info.type != pafs.FileType.Directory:
        raise CommandError(f"{path!r} is not a directory")
    if exists(fs, posixpath.join(base, "manifest.json")):
        return "run", [str(path)]
    if cmd != "report":
        raise CommandError(f"{path!r} is not a raysens run directory (no manifest.json)")
    found: list[str] = []
    level = [""]
    for _ in range(depth):
        nxt = []
        for rel in level:
            for child in fs.get_file_info(pafs.FileSelector(posixpath.join(base, rel) if rel else base)):
                if child.type != pafs.FileType.Directory:
                    continue
                name = posixpath.join(rel, child.base_name) if rel else child.base_name
                if exists(fs, posixpath.join(child.path, "manifest.json")):
                    found.append(name)
                elif not child.base_name.startswith((".", "_")) and child.base_name not in ("plots", "report", "stats", "partials"):
                    nxt.append(name)
        level = nxt
    if not found:
        raise CommandError(f"{path!r} is neither a run directory (no manifest.json) nor a sweep directory "
                           f"(no run directories with a manifest.json up to {depth} levels below it)")
    root = str(path).rstrip("/")
    return "sweep", [posixpath.join(root, r) for r in sorted(found)]


def _load(cmd: str, path: str) -> RunResult:
    find_runs(path, cmd)
    try:
        run = load_run(path)
    except Exception as e:  # unreadable stats: name the file problem
        raise CommandError(f"cannot load run {path!r}: {e}") from e
    if not run.layers:
        raise CommandError(f"run {path!r} has no layer statistics (stats/layer_*.npz) yet")
    return run


# ---------------------------------------------------------------------------- report
def _report_args(p: argparse.ArgumentParser) -> None:
    """Write report.html (self-contained) and report.md + PNGs for a run or a sweep directory."""
    p.add_argument("path", metavar="RUN_OR_SWEEP_DIR", help="a run directory, or a directory of run directories")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: <dir>/report)")
    p.add_argument("--share", type=float, default=dom.DEFAULT_SHARE,
                   help="a cell or row is 'dominated' when one sample carries more than this share of its sum "
                        "(default 0.5)")
    p.add_argument("--target-se", type=float, default=TARGET_SE, metavar="REL",
                   help="target relative SE of a cell mean for the 'samples a claim needs' table (default 0.05)")


def main_report(argv: Sequence[str] | None = None) -> int:
    args = _parse("report", argv, _report_args)
    if isinstance(args, int):
        return args
    try:
        kind, paths = find_runs(args.path, "report")
        runs = []
        for p in paths:
            try:
                runs.append(load_run(p))
            except Exception as e:
                if kind == "run":
                    raise CommandError(f"cannot load run {p!r}: {e}") from e
                print(f"raysens report: warning: skipping {p!r}: {e}", file=sys.stderr)
        runs = [r for r in runs if r.layers] if kind == "sweep" else runs
        if not runs or not any(r.layers for r in runs):
            raise CommandError(f"{args.path!r} has no layer statistics (stats/layer_*.npz) to report on")
        root = str(args.path).rstrip("/")
        out = (args.out or posixpath.join(root, "report")).rstrip("/")
        if not 0.0 < args.share < 1.0:
            raise CommandError(f"--share must be between 0 and 1, got {args.share}")
        if not (args.target_se > 0 and np.isfinite(args.target_se)):
            raise CommandError(f"--target-se must be > 0, got {args.target_se}")
        doc = build_report(kind, root, runs, args.share, args.target_se)
        fs, base = resolve(out)
        for name, png in doc.images.items():
            write_bytes(fs, posixpath.join(base, name), png)
        write_bytes(fs, posixpath.join(base, "report.md"), to_markdown(doc).encode())
        write_bytes(fs, posixpath.join(base, "report.html"), to_html(doc).encode())
    except (CommandError, ImportError) as e:
        return _failed("report", e)
    print(f"raysens report: wrote {posixpath.join(out, 'report.html')} and report.md "
          f"({len(doc.images)} plots, {len(runs)} run{'s' if len(runs) != 1 else ''})")
    return 0


# ---------------------------------------------------------------------------- show
def _show_args(p: argparse.ArgumentParser) -> None:
    """Print a terminal summary of a run: counts, skipped samples, top sensitivities, timings."""
    p.add_argument("path", metavar="RUN_DIR")
    p.add_argument("--top", type=int, default=10, help="cells to list per layer (default 10)")
    p.add_argument("--layer", type=int, action="append", help="only this layer (repeatable)")
    p.add_argument("--rows", type=int, default=5, help="most dominated rows to list per layer (default 5)")
    p.add_argument("--share", type=float, default=dom.DEFAULT_SHARE,
                   help="threshold that marks a row as dominated by one sample (default 0.5)")
    p.add_argument("--sample", type=int, metavar="ID",
                   help="plot this sample's map per layer (recomputed unless the run exported it) and exit")
    p.add_argument("--out", metavar="DIR", help="with --sample: where to write sample_<ID>_layer_NNN.png "
                                                 "(default: <run>/plots)")
    p.add_argument("--target-se", type=float, metavar="REL",
                   help="print per layer the achieved median / p90 relative SE of a cell mean (data and probe "
                        "parts) and the samples needed to reach this relative SE (e.g. 0.05)")


def _wrap(label: str, items: list[str], width: int = 100) -> list[str]:
    """``  label      a, b, c`` wrapped at ``width`` with the continuation lines aligned."""
    import textwrap

    return textwrap.wrap(", ".join(items), width, initial_indent=f"  {label:<10} ", subsequent_indent=" " * 13,
                         break_on_hyphens=False) or [f"  {label}"]


def _dominated_lines(run: RunResult, ls, n_rows: int, share: float, texts: dict) -> list[str]:
    rows = dom.top_rows(ls, n_rows)
    if not rows:
        return []
    sm = dom.summary(ls, share)
    out = [f"  rows most dominated by one sample ({sm['rows']} rows and {sm['cells']}/{sm['eligible']} cells "
           f"above {share:.0%}; 1/n = {100 / max(ls.count, 1):.2g}%):",
           f"  {'i':>4}  {'share':>6}  {'sample_id':>9}  text"]
    for r in rows:
        mark = "*" if r["share"] > share else " "
        out.append(f"  {r['i']:>4}  {r['share']:>6.1%}{mark} {r['sample_id']:>9}  "
                   + (snippet(texts.get(r["sample_id"]), 10) if texts else ""))
    return out


def format_show(run: RunResult, top: int = 10, layers: Sequence[int] | None = None, rows: int = 5,
                share: float = dom.DEFAULT_SHARE, target_se: float | None = None) -> str:
    f = an.run_facts(run.manifest, run.layers)
    m = run.manifest
    model = m.get("model") or {}
    est = f["estimator"]
    plans = an.layer_plans(m)
    if f["estimator"] == "hutchinson" and plans:
        est += " (planned per layer" + (f", {f['probe']}" if f["probe"] else "") + ")"
    elif f["estimator"] == "hutchinson":
        est += f" (K={f['num_probes']} probes" + (f", {f['probe']}" if f["probe"] else "") + ")"
    lines = [f"raysens run  {run.path}",
             f"  model      {f['model']}  [{model.get('class', '?')}, {model.get('num_hidden_layers', '?')} layers, "
             f"H={model.get('hidden_size', '?')}, {an.fmt(model.get('parameters'))} parameters]",
             f"  dataset    {f['dataset']}",
             f"  estimator  {est}, seed {f['seed']}, precision {f['precision']}",
             f"  seq len    {f['seq_len']} observed (max_seq_len {f['max_seq_len']})",
             f"  layers     {', '.join(map(str, sorted(run.layers)))}"]
    samples = m.get("samples") or {}
    sl = [(k, v) for k, v in an.sample_lines(samples, 10) if not k.startswith("skip_reasons")]
    lines += _wrap("samples", [f"{k} {an.fmt(v)}" for k, v in sl if not k.startswith("skipped_ids")]
                   or [f"{f['samples']} (from the stats)"])
    lines += [f"  {'skipped' if k == 'skipped_ids' else k.replace('skipped_ids.', 'skipped '):<10} ids {v}"
              for k, v in sl if k.startswith("skipped_ids")]
    timings = m.get("timings") or {}
    if timings:
        lines += _wrap("timings", [f"{k} {an.fmt(v)}" for k, v in an.flatten(timings)])
    for L in sorted(run.layers):
        if layers and L not in layers:
            continue
        ls = run.layers[L]
        known = an.probe_noise_known(f, an.layer_probes(f, plans, L))
        se = an.standard_errors(ls.mean, ls.var, ls.probe_noise, ls.cell_count, known)
        s = ls.mean.shape[0]
        p = plans.get(L) or {}
        planned = (f"{p.get('mode')}, K={p.get('num_probes')}" + (
            f", predicted {an.fmt(p['predicted_rel_se'] * 100, 2)}%" if p.get("predicted_rel_se") is not None else "")
            + "; ") if p else ""
        lines += ["", f"layer {L}  (S={s}, {ls.count:,} samples; {planned}median SE of a cell mean "
                      f"{an.fmt(se['rel_se'] * 100, 2)}% of it, {an.probe_part(se, known)})",
                  f"  decay      {_decay_text(ls)}",
                  f"  {'rank':>4}  {'i':>4}  {'j':>4}  {'mean':>11}  {'std':>11}  {'n':>7}"]
        for r, (i, j, mu, sd) in enumerate(an.top_cells(ls.mean, ls.std, top), 1):
            lines.append(f"  {r:>4}  {i:>4}  {j:>4}  {mu:>11.4e}  {sd:>11.3e}  {int(ls.cell_count[i, j]):>7}")
        if rows > 0:
            ids = [r["sample_id"] for r in dom.top_rows(ls, rows)]
            lines += _dominated_lines(run, ls, rows, share, sample_texts(run.manifest, ids) if ids else {})
    if target_se is not None:
        lines += samples_needed.format_target(run, target_se, layers)
    pv = paired.view(run)
    if pv is not None:  # a paired run: the layers above are side a's; the differences follow
        lines += paired.format_paired(pv, layers, top=min(top, 5), target_se=target_se)
    if f["estimator"] == "projection":
        lines += ["", "note: 'projection' is the seed tool's ‖uᵀJ_ij‖² with u = 1/√H·1, not the Frobenius norm."]
    return "\n".join(lines)


def _decay_text(ls) -> str:
    """The layer's fitted law G(r) = γ + β (r+1)^(−p) (``raysens.report.decay``) or why there is none."""
    fit, why = decay.layer_fit(ls)
    return f"G(r) = γ + β(r+1)^−p: {fit.text()}" if fit is not None else f"no fit of G(r) = γ + β(r+1)^−p: {why}"


def main_show(argv: Sequence[str] | None = None, sample_map=None) -> int:
    """``sample_map(run_dir, sample_id, layers) -> {layer: [n, n] array}`` recomputes a sample for
    ``--sample`` when the run has no per-sample export (the CLI passes ``raysens.run.sample.sample_maps``)."""
    args = _parse("show", argv, _show_args)
    if isinstance(args, int):
        return args
    try:
        run = _load("show", args.path)
        if args.layer and not set(args.layer) & set(run.layers):
            raise CommandError(f"layer(s) {args.layer} not in {args.path!r} (layers: {sorted(run.layers)})")
        if args.target_se is not None and not (args.target_se > 0 and np.isfinite(args.target_se)):
            raise CommandError(f"--target-se must be > 0, got {args.target_se}")
        if args.sample is not None:
            return _show_sample(run, args, sample_map)
    except CommandError as e:
        return _fail("show", str(e))
    print(format_show(run, args.top, args.layer, args.rows, args.share, args.target_se))
    return 0


def _show_sample(run: RunResult, args, sample_map) -> int:
    from ..store.per_sample import sample_map as exported
    from .plots import sample_png, write_pngs

    layers = [L for L in sorted(run.layers) if not args.layer or L in args.layer]
    maps = {L: exported(run.path, args.sample, L) for L in layers}
    source = "per-sample export"
    if any(v is None for v in maps.values()):
        if sample_map is None:
            raise CommandError(f"sample {args.sample} is not in the run's per-sample export and recomputing it "
                               "needs the engine (run `raysens show` from the command line)")
        try:
            maps = sample_map(run.path, args.sample, layers)
        except Exception as e:  # corpus moved, id out of range, sample skipped, model missing
            raise CommandError(f"cannot recompute sample {args.sample}: {e}") from e
        source = "recomputed with the run's model, estimator and seed"
    text = sample_texts(run.manifest, [args.sample]).get(args.sample)
    out = (args.out or posixpath.join(str(run.path).rstrip("/"), "plots")).rstrip("/")
    pngs = {f"sample_{args.sample}_layer_{L:03d}.png": sample_png(run, L, maps[L], args.sample,
                                                                   snippet(text, 12) if text else None)
            for L in layers}
    paths = write_pngs(out, pngs)
    print(f"sample {args.sample} ({source})" + (f": {snippet(text, 20)}" if text else ""))
    for L in layers:
        a = np.asarray(maps[L], float)
        ls = run.layers[L]
        with np.errstate(invalid="ignore", divide="ignore"):
            tot = np.nansum(a, axis=1)
            share = tot / np.nansum(ls.sum[:a.shape[0], :a.shape[0]], axis=1) if ls.sum is not None else None
        i = int(np.nanargmax(tot))
        line = f"  layer {L}: n={a.shape[0]} tokens, largest row total at i={i} ({tot[i]:.4e}"
        line += f", {share[i]:.1%} of that row's total over the run)" if share is not None else ")"
        print(line)
    print(f"wrote {len(paths)} plot{'s' if len(paths) != 1 else ''}: " + ", ".join(paths))
    return 0


# ---------------------------------------------------------------------------- compare
def _compare_args(p: argparse.ArgumentParser) -> None:
    """Difference heatmaps (B − A, log10 B/A) per common layer and the largest differences."""
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--out", metavar="DIR", help="where to write compare_layer_NNN.png "
                                                 "(default: ./compare_<A>_vs_<B>)")
    p.add_argument("--top", type=int, default=10, help="differences to list per layer (default 10)")


UNPAIRED_NOTE = ("note: B − A here is the difference of two independent runs (unpaired): each cell's noise is the "
                 "sum of both runs' and no cell is tested. A paired run (a `paired:` section in the run config) "
                 "computes both sides on the same tokens and probes and gives each cell's difference a standard "
                 "error and an FDR-controlled test (`raysens show` / `raysens report` on it).")


def format_compare(a: RunResult, b: RunResult, diffs: dict[int, dict], top: int = 10) -> str:
    lines = [f"A: {a.path}", f"B: {b.path}", UNPAIRED_NOTE]
    only = sorted(set(a.layers) ^ set(b.layers))
    if only:
        lines.append(f"layers in only one run (skipped): {only}")
    for L, d in diffs.items():
        sa, sb = a[L].mean.shape[0], b[L].mean.shape[0]
        lines += ["", f"layer {L}  (S: A={sa}, B={sb}; samples A={a[L].count:,}, B={b[L].count:,}; "
                      f"{d['cells']} common cells)",
                  f"  max |B − A| = {an.fmt(d['max_abs'])},  ‖B − A‖_F / ‖A‖_F = {an.fmt(d['rel_fro'])}",
                  f"  {'i':>4}  {'j':>4}  {'A':>11}  {'B':>11}  {'B − A':>11}"]
        for i, j, va, vb, dv in an.largest_differences(d, top):
            if dv == 0:
                break
            lines.append(f"  {i:>4}  {j:>4}  {va:>11.4e}  {vb:>11.4e}  {dv:>+11.3e}")
        if d["max_abs"] == 0:
            lines.append("  identical")
    return "\n".join(lines)


def main_compare(argv: Sequence[str] | None = None) -> int:
    args = _parse("compare", argv, _compare_args)
    if isinstance(args, int):
        return args
    try:
        a, b = _load("compare", args.run_a), _load("compare", args.run_b)
        common = sorted(set(a.layers) & set(b.layers))
        if not common:
            raise CommandError(f"the runs share no layer (A: {sorted(a.layers)}, B: {sorted(b.layers)})")
        diffs = {L: an.difference(a[L].mean, b[L].mean) for L in common}
        name = lambda p: posixpath.basename(str(p).rstrip("/")) or "run"  # noqa: E731
        out = (args.out or f"compare_{name(a.path)}_vs_{name(b.path)}").rstrip("/")
        from .plots import compare_png, write_pngs

        paths = write_pngs(out, {f"compare_layer_{L:03d}.png": compare_png(a, b, L, diffs[L]) for L in common})
    except (CommandError, ImportError) as e:
        return _failed("compare", e)
    print(format_compare(a, b, diffs, args.top))
    print(f"\nwrote {len(paths)} plot{'s' if len(paths) != 1 else ''} to {out}/")
    return 0


def differences(a: RunResult, b: RunResult) -> dict[int, np.ndarray]:
    """``{layer: mean_B − mean_A}`` for the common layers (for scripts and tests)."""
    return {L: an.difference(a[L].mean, b[L].mean)["diff"] for L in sorted(set(a.layers) & set(b.layers))}
