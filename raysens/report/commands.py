"""``raysens report`` / ``raysens show`` / ``raysens compare``: look at run directories.

- ``raysens report RUN_OR_SWEEP_DIR [--out DIR]`` writes ``report.html`` (self-contained, PNGs
  embedded) and ``report.md`` with the PNG files beside it. A sweep directory is one that holds
  several run directories (each with a ``manifest.json``) up to two levels down.
- ``raysens show RUN_DIR`` prints counts, skipped samples, the top sensitivities per layer, the
  estimator and timings.
- ``raysens compare RUN_A RUN_B [--out DIR]`` writes B − A difference heatmaps and prints the largest
  differences.

Each ``main_*`` takes an argv list and returns an exit code (0 ok, 1 bad input, 2 usage).
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from typing import Sequence

import numpy as np
import pyarrow.fs as pafs

from . import analysis as an
from .content import build_report
from .render import to_html, to_markdown
from ..store.results import RunResult, exists, load_run, resolve, write_bytes


class CommandError(Exception):
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
        doc = build_report(kind, root, runs)
        fs, base = resolve(out)
        for name, png in doc.images.items():
            write_bytes(fs, posixpath.join(base, name), png)
        write_bytes(fs, posixpath.join(base, "report.md"), to_markdown(doc).encode())
        write_bytes(fs, posixpath.join(base, "report.html"), to_html(doc).encode())
    except CommandError as e:
        return _fail("report", str(e))
    print(f"raysens report: wrote {posixpath.join(out, 'report.html')} and report.md "
          f"({len(doc.images)} plots, {len(runs)} run{'s' if len(runs) != 1 else ''})")
    return 0


# ---------------------------------------------------------------------------- show
def _show_args(p: argparse.ArgumentParser) -> None:
    """Print a terminal summary of a run: counts, skipped samples, top sensitivities, timings."""
    p.add_argument("path", metavar="RUN_DIR")
    p.add_argument("--top", type=int, default=10, help="cells to list per layer (default 10)")
    p.add_argument("--layer", type=int, action="append", help="only this layer (repeatable)")


def _wrap(label: str, items: list[str], width: int = 100) -> list[str]:
    """``  label      a, b, c`` wrapped at ``width`` with the continuation lines aligned."""
    import textwrap

    return textwrap.wrap(", ".join(items), width, initial_indent=f"  {label:<10} ", subsequent_indent=" " * 13,
                         break_on_hyphens=False) or [f"  {label}"]


def format_show(run: RunResult, top: int = 10, layers: Sequence[int] | None = None) -> str:
    f = an.run_facts(run.manifest, run.layers)
    m = run.manifest
    model = m.get("model") or {}
    est = f["estimator"]
    if f["estimator"] == "hutchinson":
        est += f" (K={f['num_probes']} probes" + (f", {f['probe']}" if f["probe"] else "") + ")"
    lines = [f"raysens run  {run.path}",
             f"  model      {f['model']}  [{model.get('class', '?')}, {model.get('num_hidden_layers', '?')} layers, "
             f"H={model.get('hidden_size', '?')}, {an.fmt(model.get('parameters'))} parameters]",
             f"  dataset    {f['dataset']}",
             f"  estimator  {est}, seed {f['seed']}",
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
        se = an.standard_errors(ls.mean, ls.var, ls.probe_noise, ls.cell_count)
        s = ls.mean.shape[0]
        lines += ["", f"layer {L}  (S={s}, {ls.count:,} samples; median SE of a cell mean "
                      f"{an.fmt(se['rel_se'] * 100, 2)}% of it, probe part {an.fmt(se['rel_probe_se'] * 100, 2)}%)",
                  f"  {'rank':>4}  {'i':>4}  {'j':>4}  {'mean':>11}  {'std':>11}  {'n':>7}"]
        for r, (i, j, mu, sd) in enumerate(an.top_cells(ls.mean, ls.std, top), 1):
            lines.append(f"  {r:>4}  {i:>4}  {j:>4}  {mu:>11.4e}  {sd:>11.3e}  {int(ls.cell_count[i, j]):>7}")
    if f["estimator"] == "projection":
        lines += ["", "note: 'projection' is the seed tool's ‖uᵀJ_ij‖² with u = 1/√H·1, not the Frobenius norm."]
    return "\n".join(lines)


def main_show(argv: Sequence[str] | None = None) -> int:
    args = _parse("show", argv, _show_args)
    if isinstance(args, int):
        return args
    try:
        run = _load("show", args.path)
        if args.layer and not set(args.layer) & set(run.layers):
            raise CommandError(f"layer(s) {args.layer} not in {args.path!r} (layers: {sorted(run.layers)})")
    except CommandError as e:
        return _fail("show", str(e))
    print(format_show(run, args.top, args.layer))
    return 0


# ---------------------------------------------------------------------------- compare
def _compare_args(p: argparse.ArgumentParser) -> None:
    """Difference heatmaps (B − A, log10 B/A) per common layer and the largest differences."""
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--out", metavar="DIR", help="where to write compare_layer_NNN.png "
                                                 "(default: ./compare_<A>_vs_<B>)")
    p.add_argument("--top", type=int, default=10, help="differences to list per layer (default 10)")


def format_compare(a: RunResult, b: RunResult, diffs: dict[int, dict], top: int = 10) -> str:
    lines = [f"A: {a.path}", f"B: {b.path}"]
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
    except CommandError as e:
        return _fail("compare", str(e))
    print(format_compare(a, b, diffs, args.top))
    print(f"\nwrote {len(paths)} plot{'s' if len(paths) != 1 else ''} to {out}/")
    return 0


def differences(a: RunResult, b: RunResult) -> dict[int, np.ndarray]:
    """``{layer: mean_B − mean_A}`` for the common layers (for scripts and tests)."""
    return {L: an.difference(a[L].mean, b[L].mean)["diff"] for L in sorted(set(a.layers) & set(b.layers))}
