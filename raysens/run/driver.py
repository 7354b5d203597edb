"""Driver side of a run: progress lines and the final merge of a run directory's partials into
dataset statistics, manifest and plots. No Ray.
"""

from __future__ import annotations

import os
import posixpath
import time

import numpy as np

from .._log import log, now_iso
from ..stats.cells import CellStats
from ..store import results
from ..store.partials import SKIP_REASONS
from ..store.rundir import RunDir, RunError
from .prepare import PreparedRun

__all__ = ["Progress", "finalize", "write_plots", "RunError"]


class Progress:
    """``[raysens] 120/300 samples (40%) · 3.2 samples/s · ETA 56s`` every ``every_s`` seconds.

    The rate is measured from the first result on (once that is 5 s ago), so start-up (Ray, actors,
    model loading) does not distort the ETA.
    """

    def __init__(self, total: int, done: int, every_s: float):
        self.total, self.done, self.every_s = total, done, every_s
        self.start = done  # samples already done before this run (resumed partials)
        self.first: tuple[float, int] | None = None  # (time, samples done) right after the first result
        self.last = -1e9

    def update(self, n: int) -> None:
        now = time.perf_counter()
        self.done += n
        if self.first is None:
            self.first = (now, self.done)
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            log(self.line(now))

    def rate(self, now: float) -> float | None:
        """samples/s since the first result, once that is 5 s ago (None before)."""
        if self.first and self.done > self.first[1] and now - self.first[0] >= 5.0:
            return (self.done - self.first[1]) / (now - self.first[0])
        return None

    def line(self, now: float) -> str:
        pct = 100.0 * self.done / max(self.total, 1)
        head = f"{self.done}/{self.total} samples ({pct:.0f}%)"
        rate = self.rate(now)
        if rate is None:
            return head + (" · measuring the rate" if self.done < self.total else "")
        return f"{head} · {rate:.2f} samples/s · ETA {_fmt_s((self.total - self.done) / rate)}"


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def finalize(prepared: PreparedRun, rdir: RunDir, manifest: dict, timings: dict, backend: dict) -> dict:
    """Merge the checkpoint and every partial (one file at a time), write stats, manifest and plots."""
    # the checkpoint's merge (rolling compaction) continued with the remaining partials (exact and
    # order-independent: raysens.stats.cells; raysens.store.checkpoint.Fold: accumulators follow the
    # observed lengths, grown as longer partials arrive, never the configured max_seq_len)
    if prepared.config.output.compact_every:  # fold the tail too: a finished run keeps a checkpoint and no partial
        rdir.compact(1)
    fold = rdir.fold_all()
    acc, per_sample, computed, compute_s = fold.acc, fold.per_sample, fold.computed, fold.compute_s
    if not prepared.config.output.per_sample:
        per_sample = None
    skipped, model, devices, strategies, modes = fold.skipped, fold.model, fold.devices, fold.strategies, fold.modes
    skipped = {r: ids for r, ids in skipped.items() if ids}
    n_skipped = sum(len(v) for v in skipped.values())
    m = dict(manifest)
    m["model"] = {**m["model"], **(model or {})}
    m["samples"] = {**m["samples"], "computed": computed, "skipped": n_skipped,
                    "skipped_by_reason": {r: len(v) for r, v in skipped.items()}, "skipped_ids": skipped,
                    "skip_reasons": {r: SKIP_REASONS[r] for r in skipped}}
    m["units"] = {**m["units"], "reused": len(prepared.units) - rdir.written, "computed_this_run": rdir.written,
                  "corrupt_recomputed": rdir.corrupt,
                  "compaction": {**rdir.compaction, "compact_every": prepared.config.output.compact_every}}
    m["timings"] = {**m["timings"], **timings, "finished": now_iso(), "compute_s_total": round(compute_s, 3)}
    m["backend"] = {**backend, "devices": sorted(d for d in devices if d), "strategies": sorted(strategies),
                    "modes": sorted(modes)}
    if computed == 0:
        m["status"] = "failed"
        m["error"] = (f"no sample could be computed: all {prepared.n_selected} selected samples were skipped "
                      f"({m['samples']['skipped_by_reason']})")
        results.write_manifest(prepared.run_dir, m)
        raise RunError(f"{m['error']}; see {prepared.run_dir}/manifest.json")
    paired = prepared.config.paired
    empty = CellStats.empty
    if paired is not None:
        from ..stats.paired import PairedCells

        empty = PairedCells.empty
    acc = {L: st if st is not None else empty(1) for L, st in acc.items()}
    seq = _observed_len(acc)
    m["seq_len"] = seq
    _write_stats(prepared.run_dir, acc, seq, paired.fdr if paired is not None else None)
    m["stats"] = {str(L): results.layer_file(L) for L in acc}  # side a's (a paired run read as a run of model a)
    if paired is not None:
        from ..store.paired_results import B_FILE, DIFF_FILE
        from .paired import manifest_key

        m["paired"] = manifest_key(prepared.config, prepared, stats_b={str(L): B_FILE.format(L) for L in acc},
                                   stats_diff={str(L): DIFF_FILE.format(L) for L in acc})
    if per_sample is not None:
        if per_sample["missing_units"]:
            per_sample["note"] = ("these units' partials were computed without output.per_sample (an earlier "
                                  "invocation); delete them to recompute them with their maps")
            log(f"per-sample export: {len(per_sample['missing_units'])} unit(s) have no per-sample maps "
                f"(computed before output.per_sample was on): {per_sample['missing_units'][:5]}")
        m["per_sample"] = per_sample
    m["status"] = "complete"
    results.write_manifest(prepared.run_dir, m)  # complete before plotting: a plotting failure loses nothing
    if prepared.config.output.plots:
        m["plots"] = write_plots(prepared.run_dir)
    return m


def _write_stats(run_dir: str, acc: dict[int, CellStats], seq: int, fdr: float | None = None) -> None:
    """Every layer's stats files. Two layers at a time where the cores and memory allow (zlib, numpy's
    large reductions and Parquet release the GIL: at S = 512 a layer's statistics and files take ~2 s,
    most of it compression); one at a time from S = 1024 (a layer's statistics then take ~1 GiB).
    ``fdr`` (a paired run: ``acc`` holds ``PairedCells``): side a's, side b's and the differences' files
    (``store.paired_results.write_paired_layer``)."""
    from concurrent.futures import ThreadPoolExecutor

    def write(item: tuple[int, CellStats]) -> None:
        if fdr is not None:
            from ..store.paired_results import write_paired_layer

            write_paired_layer(run_dir, item[0], item[1].crop(seq), fdr=fdr)
            return
        results.write_layer_stats(run_dir, item[0], item[1].crop(seq))

    workers = min(2, os.cpu_count() or 1) if seq <= 512 and len(acc) > 1 else 1
    if workers == 1:
        for item in acc.items():
            write(item)
        return
    with ThreadPoolExecutor(workers) as ex:  # exceptions re-raised by list(); files are per layer
        list(ex.map(write, acc.items()))


def _observed_len(acc: dict[int, CellStats]) -> int:
    reached = np.zeros(next(iter(acc.values())).shape[0], bool)
    for st in acc.values():
        reached |= st.count.any(axis=1)
    return int(np.nonzero(reached)[0].max()) + 1


def write_plots(run_dir: str) -> list[str]:
    """Heatmaps etc. through ``raysens.report.plots``; a plotting failure is logged, never fatal."""
    try:
        from ..report.plots import write_run_plots

        paths = write_run_plots(run_dir)
    except Exception as exc:  # matplotlib missing or a plotting bug must not lose a finished run
        log(f"plots skipped ({type(exc).__name__}: {exc})")
        return []
    fs, base = results.resolve(run_dir)
    return [posixpath.relpath(p, base) if p.startswith(base) else p for p in paths]
