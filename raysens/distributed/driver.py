"""Driver side of a run: validation, the run directory, resume, progress, the final merge.

Run directory (local path or any ``pyarrow.fs`` URI; DESIGN.md §5)::

    manifest.json           status, config + fingerprint, versions, model, samples, skips, timings
    partials/unit_<first sample_id>-<sha256[:16]>.npz   one per work unit, written as they arrive
    partials/corrupt/…      partials that failed validation on resume (kept, never merged)
    stats/layer_NNN.npz|.parquet   dataset statistics per target layer (raysens.results)
    plots/*.png             heatmaps (raysens.plots)

The partials are the source of truth: the statistics are always rebuilt from them, one file at a
time in sample_id order, so driver memory does not grow with the number of samples and a resumed
run gives bit for bit what an uninterrupted one gives.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import posixpath
import platform
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from .. import results
from ..config import RunConfig
from ..corpus import Corpus
from ..welford import WelfordState
from .work import PARTIAL_RE, SKIP_REASONS, PartialError, decode_partial, partial_name, plan_units

PARTIALS = "partials"


class RunError(RuntimeError):
    """The run cannot start or cannot finish; the message says why. Persisted partials are kept."""


def log(msg: str) -> None:
    print(f"[raysens] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunPlan:
    """Everything decided before any work starts (validated; nothing written yet)."""

    config: RunConfig
    fingerprint: str
    run_dir: str
    corpus: Corpus
    n_rows: int
    units: list[np.ndarray]  # every unit of the run, in sample_id order
    layers: tuple[int, ...]  # absolute hidden_states indices
    model_config: dict  # model_type, num_hidden_layers, hidden_size (from the config only)

    @property
    def n_selected(self) -> int:
        return int(sum(len(u) for u in self.units))

    @functools.cached_property
    def by_key(self) -> dict[int, np.ndarray]:
        """unit key (first sample_id) -> the unit's sample_ids"""
        return {int(u[0]): u for u in self.units}


def default_run_dir(config: RunConfig) -> str:
    name = config.model.name.rstrip("/").replace("\\", "/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name[:-5] if name.endswith(".gguf") else name)
    return posixpath.join("runs", f"{name}-{config.fingerprint()}")


def _run_dir(config: RunConfig) -> str:
    """output.dir as given for URIs; local paths made absolute (and a warning inside a Ray job,
    where a relative path lands in the job's temporary copy of the working directory)."""
    d = config.output.dir or default_run_dir(config)
    if "://" in d:
        return d
    if not os.path.isabs(os.path.expanduser(d)) and "job_submission_id" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""):
        log(f"warning: output.dir {d!r} is relative; inside a Ray job it resolves to {os.path.abspath(d)} on the node "
            "running the driver (a temporary copy of the working dir). Pass --output.dir=s3://... (or a shared path) "
            "to read the results from elsewhere.")
    return os.path.abspath(os.path.expanduser(d))


def prepare(config: RunConfig) -> RunPlan:
    """Validate the corpus, model and layers and plan the units. Writes nothing."""
    from ..engine import resolve_layer_indices
    from ..models import load_tokenizer_and_config

    corpus = Corpus(config.data)
    n_rows = corpus.num_rows()
    selected = corpus.select(n_rows)
    _, mcfg = load_tokenizer_and_config(config.model.name, trust_remote_code=config.model.trust_remote_code)
    n_layers = int(mcfg.num_hidden_layers)
    try:
        layers = resolve_layer_indices(list(config.layers), n_layers)
    except ValueError as exc:
        raise RunError(f"layers: {exc}".replace("SensitivityEngine.compute: ", "")) from None
    return RunPlan(config, config.fingerprint(), _run_dir(config), corpus, n_rows,
                   plan_units(selected, config.cluster.batch_size), layers,
                   {"model_type": getattr(mcfg, "model_type", None), "num_hidden_layers": n_layers,
                    "hidden_size": int(getattr(mcfg, "hidden_size", 0) or 0)})


# ---------------------------------------------------------------------- run directory and resume
class RunDir:
    """Partials of one run directory: what is already done, what arrives, what it all merges to."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.fs, self.base = results.resolve(plan.run_dir)
        self.pdir = posixpath.join(self.base, PARTIALS)
        self.done: dict[int, str] = {}  # unit key -> partial file name
        self.corrupt: list[dict] = []  # partials moved aside on this start
        self.written = 0  # partials written by this run
        self.samples_written = 0  # sample_ids in those partials
        self._exit_after = int(os.environ.get("RAYSENS_TEST_DRIVER_EXIT_AFTER_UNITS", "0") or 0)

    def _path(self, name: str) -> str:
        return posixpath.join(self.pdir, name)

    def open(self) -> None:
        """Check the directory belongs to this configuration and collect the valid partials."""
        plan, fs = self.plan, self.fs
        mpath = posixpath.join(self.base, "manifest.json")
        if results.exists(fs, mpath):
            try:
                old = results.read_manifest(plan.run_dir)
            except ValueError:
                old = {}
            if old.get("fingerprint") not in (None, plan.fingerprint):
                raise RunError(
                    f"output directory {plan.run_dir!r} holds a run with a different configuration "
                    f"(fingerprint {old.get('fingerprint')}, this config {plan.fingerprint}); "
                    "use another output.dir (nothing was changed)")
        names = sorted(posixpath.basename(i.path) for i in fs.get_file_info(
            pafs.FileSelector(self.pdir, allow_not_found=True)) if i.type == pafs.FileType.File)
        if names and not plan.config.output.resume:
            raise RunError(f"output directory {plan.run_dir!r} already has {len(names)} partials and "
                           "output.resume is false; use another output.dir (nothing was changed)")
        units = plan.by_key
        for name in names:
            if name.endswith(".tmp"):
                self._move_aside(name, "unfinished write")
                continue
            m = PARTIAL_RE.match(name)
            key = int(m.group(1)) if m else None
            if key in self.done:
                continue  # a second valid copy of a unit: ignored
            try:
                if key not in units:
                    raise PartialError(f"{name}: not a unit of this run")
                self._decode(name, units[key])
            except PartialError as exc:
                self._move_aside(name, str(exc))
                continue
            self.done[key] = name
        if self.done or self.corrupt:
            log(f"resuming in {plan.run_dir}: {len(self.done)}/{len(units)} units already done"
                + (f", {len(self.corrupt)} corrupt partial(s) set aside and recomputed" if self.corrupt else ""))

    def _move_aside(self, name: str, reason: str) -> None:
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        dst = posixpath.join(self.pdir, "corrupt", f"{name}.{stamp}")
        self.fs.create_dir(posixpath.dirname(dst), recursive=True)
        self.fs.move(self._path(name), dst)
        self.corrupt.append({"file": name, "reason": reason, "moved_to": posixpath.relpath(dst, self.base)})
        log(f"partial {name} is invalid ({reason}); moved to {posixpath.relpath(dst, self.base)}, will recompute")

    def _decode(self, name: str, ids: np.ndarray):
        plan = self.plan
        return decode_partial(results.read_bytes(self.fs, self._path(name)), name=name,
                              fingerprint=plan.fingerprint, sample_ids=ids, layers=plan.layers,
                              max_seq_len=plan.config.data.max_seq_len)

    def todo(self) -> list[np.ndarray]:
        return [u for u in self.plan.units if int(u[0]) not in self.done]

    def add(self, unit: int, payload: bytes) -> bool:
        """Persist one unit's partial (a retried unit already persisted is ignored). True if new."""
        unit = int(unit)
        if unit in self.done:
            return False
        name = partial_name(unit, payload)
        results.write_bytes(self.fs, self._path(name), payload)
        self.done[unit] = name
        self.written += 1
        self.samples_written += len(self.plan.by_key[unit])
        if self._exit_after and self.written >= self._exit_after:  # test-only: simulate a driver crash
            log(f"RAYSENS_TEST_DRIVER_EXIT_AFTER_UNITS={self._exit_after}: driver exits now")
            os._exit(3)
        return True

    def partials(self):
        """Valid partials in sample_id order, read one at a time."""
        units = self.plan.by_key
        for key in sorted(self.done):
            name = self.done[key]
            try:
                yield self._decode(name, units[key])
            except PartialError as exc:
                raise RunError(f"partial {name} changed while the run was finishing ({exc}); "
                               "rerun to recompute it") from None


# ---------------------------------------------------------------------- progress
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


# ---------------------------------------------------------------------- manifest and final merge
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("raysens", "torch", "transformers", "ray", "numpy", "pyarrow", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def base_manifest(plan: RunPlan, status: str, started: str) -> dict:
    cfg = plan.config
    sens = cfg.sensitivity.to_dict()
    return {
        "format": "raysens-run/1", "status": status, "fingerprint": plan.fingerprint,
        "config": cfg.to_dict(), "versions": versions(),
        "model": {"name": cfg.model.name, **plan.model_config},
        "estimator": sens["estimator"], "num_probes": sens["num_probes"], "seed": sens["seed"],
        "layers": list(plan.layers), "max_seq_len": cfg.data.max_seq_len,
        "corpus": {**plan.corpus.describe(), "rows": plan.n_rows},
        "samples": {"corpus_rows": plan.n_rows, "total": plan.n_selected},
        "units": {"total": len(plan.units), "batch_size": cfg.cluster.batch_size},
        "timings": {"started": started},
    }


def finalize(plan: RunPlan, rdir: RunDir, manifest: dict, timings: dict, backend: dict) -> dict:
    """Merge every partial (sample_id order, one file at a time), write stats, manifest and plots."""
    S = plan.config.data.max_seq_len
    acc = {L: WelfordState.empty(S) for L in plan.layers}
    skipped: dict[str, list[int]] = {r: [] for r in SKIP_REASONS}
    computed, compute_s, model, devices, strategies = 0, 0.0, None, set(), set()
    for p in rdir.partials():
        for L, st in p.states.items():
            acc[L].merge(st.padded(S) if st.shape[0] < S else st)
        for sid, reason in sorted(p.skipped.items()):
            skipped[reason].append(sid)
        computed += len(p.computed_ids)
        compute_s += float(p.meta.get("compute_s", 0.0))
        model = model or p.meta.get("model")
        devices.add(p.meta.get("device"))
        if p.meta.get("strategy"):
            strategies.add(p.meta["strategy"])
    skipped = {r: ids for r, ids in skipped.items() if ids}
    n_skipped = sum(len(v) for v in skipped.values())
    m = dict(manifest)
    m["model"] = {**m["model"], **(model or {})}
    m["samples"] = {**m["samples"], "computed": computed, "skipped": n_skipped,
                    "skipped_by_reason": {r: len(v) for r, v in skipped.items()}, "skipped_ids": skipped,
                    "skip_reasons": {r: SKIP_REASONS[r] for r in skipped}}
    m["units"] = {**m["units"], "reused": len(plan.units) - rdir.written, "computed_this_run": rdir.written,
                  "corrupt_recomputed": rdir.corrupt}
    m["timings"] = {**m["timings"], **timings, "finished": now_iso(), "compute_s_total": round(compute_s, 3)}
    m["backend"] = {**backend, "devices": sorted(d for d in devices if d), "strategies": sorted(strategies)}
    if computed == 0:
        m["status"] = "failed"
        results.write_manifest(plan.run_dir, m)
        raise RunError(f"no sample could be computed: all {plan.n_selected} selected samples were skipped "
                       f"({m['samples']['skipped_by_reason']}); see {plan.run_dir}/manifest.json")
    seq = _observed_len(acc)
    m["seq_len"] = seq
    for L, st in acc.items():
        results.write_layer_stats(plan.run_dir, L, _crop(st, seq))
    m["stats"] = {str(L): results.layer_file(L) for L in acc}
    m["status"] = "complete"
    results.write_manifest(plan.run_dir, m)  # complete before plotting: a plotting failure loses nothing
    if plan.config.output.plots:
        m["plots"] = write_plots(plan.run_dir)
    return m


def _observed_len(acc: dict[int, WelfordState]) -> int:
    reached = np.zeros(next(iter(acc.values())).shape[0], bool)
    for st in acc.values():
        reached |= st.count.any(axis=1)
    return int(np.nonzero(reached)[0].max()) + 1


def _crop(st: WelfordState, s: int) -> WelfordState:
    return WelfordState(st.count[:s, :s].copy(), st.mean[:s, :s].copy(), st.m2[:s, :s].copy(),
                        st.noise_sum[:s, :s].copy(), st.samples)


def write_plots(run_dir: str) -> list[str]:
    """Heatmaps etc. through ``raysens.plots``; a plotting failure is logged, never fatal."""
    try:
        from ..plots import write_run_plots

        paths = write_run_plots(run_dir)
    except Exception as exc:  # matplotlib missing or a plotting bug must not lose a finished run
        log(f"plots skipped ({type(exc).__name__}: {exc})")
        return []
    fs, base = results.resolve(run_dir)
    return [posixpath.relpath(p, base) if p.startswith(base) else p for p in paths]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
