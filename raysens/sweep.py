"""Sweeps: a grid of runs (models × sequence lengths × datasets × estimators) in one job.

    from raysens.sweep import load_sweep, expand, run_sweep
    sweep = load_sweep("jobs/configs/sweep_tiny_10k.yaml", ["--grid.seq_lens=[16]"])
    for cell in expand(sweep): print(cell.name, cell.config.layers)
    summary = run_sweep(sweep)          # python jobs/sweep.py CONFIG / raysens sweep CONFIG

A sweep YAML has a ``base`` run config (the keys of ``jobs/configs/*.yaml``, see ``raysens.config``)
and a ``grid`` whose axes replace parts of it::

    name: tiny-10k
    dir: runs/sweep-tiny-10k        # the sweep directory (local path or pyarrow.fs URI)
    base: {data: ..., sensitivity: ..., cluster: ..., output: {plots: true}}
    grid:
      models: [random:tiny-gpt2, {name: /models/qwen2, label: qwen2, layers: all}]
      seq_lens: [16, 32]            # data.max_seq_len
      datasets: [{label: web, source: s3://b/web.parquet}]   # merged over base.data
      estimators: [{estimator: hutchinson, num_probes: 2}, {estimator: projection}]  # over base.sensitivity
      layers: all                   # or [1, -1], or per model: {tiny-gpt2: all, qwen2: [7, 14, 28]}
    corpus: {samples: 10000, words: 24}   # optional: generate the corpus (see below)

Every axis is optional (one value: the base's). Cells are the cartesian product, in the order
models, datasets, seq_lens, estimators; each cell is one ``RunConfig`` whose layers all share one
forward pass. Unknown keys are errors at every level, as in run configs.

Layout::

    <dir>/sweep.json                      the cells (name, axes, fingerprint, status, samples), timings,
                                          driver memory, model loads per model; ``history``: the same
                                          figures of earlier invocations (restarts)
    <dir>/<model>__S<S>__<data>__<est>/   one ordinary run directory per cell (raysens.load_run,
                                          raysens report/show work on it; raysens report <dir>
                                          reports the whole sweep)
    <dir>/corpus/…                        the generated corpus, when ``corpus`` is given

How it runs: all cells are validated and their run directories opened first (nothing is computed
when one cell is invalid). Cells whose manifest says ``complete`` with the same fingerprint are
skipped; the others resume from their own partials (the pipeline's resume logic). Then, per model,
ONE pass over one actor pool computes the units of all that model's unfinished cells: each actor
loads the weights once and keeps one worker per cell over them (``raypipe.run_cells``); the driver
routes each partial to its cell's run directory and finalizes a cell as soon as its last unit has
arrived. Ray is initialised once for the whole sweep. With ``cluster.use_ray: false`` the same
happens in this process (one model load per model).

``corpus: {samples: N, words: W}`` writes ``<dir>/corpus/bundled-windows-N-W.txt``: N lines, each
W consecutive words of the bundled corpus (rows concatenated in order), starting every ``stride``
words (stride = (total words − W) // (N − 1), lowered if needed), skipping windows whose first
half repeats an earlier one (the corpus repeats a few passages): N different texts, N distinct
sample_ids. The sweep uses it as ``base.data`` (kind text). It exists so a scaled-down sweep
can run 10,000 samples here, where the bundled corpus has 1,377 rows; real sweeps point
``data.source`` at a real dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import posixpath
import re
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import results
from .config import ConfigError, RunConfig, merge_dicts, parse_overrides, read_yaml_mapping

SWEEP_KEYS = ("name", "dir", "base", "grid", "corpus")
GRID_KEYS = ("models", "seq_lens", "datasets", "estimators", "layers")
MODEL_KEYS = ("name", "label", "layers", "trust_remote_code", "device")
CORPUS_KEYS = ("samples", "words")
_TEST_INTERRUPT_AFTER_UNITS = 0  # tests: raise _TestInterrupt after this many units (simulated Ctrl-C)


class SweepError(RuntimeError):
    """The sweep cannot start or some of its cells failed; the message names them."""


class _TestInterrupt(BaseException):
    """Raised by the test hook ``_TEST_INTERRUPT_AFTER_UNITS`` (like a KeyboardInterrupt)."""


# ---------------------------------------------------------------------- config
@dataclass
class Sweep:
    """A validated sweep config (``load_sweep``); ``raw`` is the dict it was built from."""

    name: str
    dir: str
    base: dict
    grid: dict
    corpus: dict | None
    raw: dict = field(repr=False, default_factory=dict)


@dataclass
class Cell:
    """One run of the sweep."""

    name: str  # run directory name inside the sweep dir
    axes: dict  # model, seq_len, dataset, estimator labels
    config: RunConfig  # output.dir = <sweep dir>/<name>

    @property
    def model_key(self) -> tuple:
        m = self.config.model
        return (m.name, m.trust_remote_code, m.device)


def _check_keys(d: Any, known: tuple, where: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {d!r}")
    unknown = sorted(set(d) - set(known), key=str)
    if unknown:
        raise ConfigError(f"unknown sweep key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(f'{where}.{u}' if where != 'sweep' else str(u) for u in unknown)}; "
                          f"known keys in {where}: {', '.join(known)}")


def _as_list(v: Any, key: str) -> list:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{key} must be a non-empty list, got {v!r}")
    return v


def sweep_from_dict(d: dict) -> Sweep:
    """Validate a sweep dict (unknown keys, types, every cell's run config). Writes nothing."""
    _check_keys(d, SWEEP_KEYS, "sweep")
    name = d.get("name") or "sweep"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"name must be letters, digits, '.', '_' or '-', got {name!r}")
    base = d.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"base must be a mapping of run config sections, got {base!r}")
    if (base.get("output") or {}).get("dir") is not None:
        raise ConfigError("base.output.dir must not be set: each cell writes <dir>/<cell name>; set the sweep's dir")
    grid = d.get("grid") or {}
    _check_keys(grid, GRID_KEYS, "grid")
    for k in ("models", "seq_lens", "datasets", "estimators"):
        if k in grid:
            _as_list(grid[k], f"grid.{k}")
    for i, m in enumerate(grid.get("models", [])):
        if isinstance(m, dict):
            _check_keys(m, MODEL_KEYS, f"grid.models[{i}]")
            if not isinstance(m.get("name"), str):
                raise ConfigError(f"grid.models[{i}].name must be a model name")
        elif not isinstance(m, str):
            raise ConfigError(f"grid.models[{i}] must be a model name or a mapping with name, got {m!r}")
    for i, s in enumerate(grid.get("seq_lens", [])):
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"grid.seq_lens[{i}] must be an integer >= 1, got {s!r}")
    for k in ("datasets", "estimators"):
        for i, e in enumerate(grid.get(k, [])):
            if not isinstance(e, dict):
                raise ConfigError(f"grid.{k}[{i}] must be a mapping, got {e!r}")
    corpus = d.get("corpus")
    if corpus is not None:
        _check_keys(corpus, CORPUS_KEYS, "corpus")
        for k in CORPUS_KEYS:
            v = corpus.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"corpus.{k} must be an integer >= 1, got {v!r}")
    sweep_dir = d.get("dir") or posixpath.join("runs", f"sweep-{name}")
    if not isinstance(sweep_dir, str):
        raise ConfigError(f"dir must be a path or URI, got {sweep_dir!r}")
    if "://" not in sweep_dir:
        sweep_dir = os.path.abspath(os.path.expanduser(sweep_dir))
    sw = Sweep(name, sweep_dir, base, grid, corpus, d)
    expand(sw, resolve_all_layers=False)  # every cell must be a valid run config
    return sw


def load_sweep(path: str | Path, overrides: list[str] | dict | None = None) -> Sweep:
    """Read a sweep YAML and apply overrides.

    Overrides are dotted keys with YAML values. Keys that start with a sweep key (``name``, ``dir``,
    ``base``, ``grid``, ``corpus``) address the sweep; any other key is a run-config key applied to
    ``base``: ``--data.limit=100`` is ``--base.data.limit=100``, ``--address=...`` is
    ``--base.cluster.address=...``.
    """
    d = read_yaml_mapping(path, "sweep config")
    over = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    routed: dict = {}
    for k, v in over.items():
        if k in SWEEP_KEYS:
            routed = merge_dicts(routed, {k: v})
        else:
            routed = merge_dicts(routed, {"base": {k: v}})
    return sweep_from_dict(merge_dicts(d, routed))


# ---------------------------------------------------------------------- expansion
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(s)).strip("-.") or "x"


def model_label(name: str) -> str:
    """``random:tiny-gpt2`` -> ``tiny-gpt2``; ``/ckpt/qwen2-1.5b/`` -> ``qwen2-1.5b``; ``x.gguf`` -> ``x``."""
    n = name.split(":", 1)[1] if name.startswith("random:") else name.rstrip("/").replace("\\", "/").split("/")[-1]
    return _slug(n[:-5] if n.endswith(".gguf") else n)


def dataset_label(data: dict) -> str:
    src = str(data.get("source", "bundled"))
    if src == "bundled":
        return "bundled"
    stem = src.rstrip("/").split("/")[-1]
    for ext in (".jsonl.gz", ".jsonl", ".json", ".ndjson", ".parquet", ".txt", ".text"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return _slug(stem)


def estimator_label(sens: dict) -> str:
    est = str(sens.get("estimator", "hutchinson"))
    if est == "hutchinson":
        return f"hutchinson-K{sens.get('num_probes', 1)}"
    return _slug(est)


def _resolve_layers(spec: Any, model: str, trust_remote_code: bool, resolve_all: bool) -> list:
    if spec == "all":
        if not resolve_all:
            return [-1]  # placeholder while validating; resolved from the model config at run time
        from .models import load_tokenizer_and_config

        _, mcfg = load_tokenizer_and_config(model, trust_remote_code=trust_remote_code)
        return list(range(1, int(mcfg.num_hidden_layers) + 1))  # hidden_states 1..n: after each block
    return spec


def expand(sweep: Sweep, resolve_all_layers: bool = True) -> list[Cell]:
    """The cells of a sweep, in run order (grouped by model). ``layers: all`` is resolved from each
    model's config (``resolve_all_layers``), i.e. hidden_states 1..num_hidden_layers."""
    base, grid = sweep.base, sweep.grid
    base_model = base.get("model") or {}
    models = []
    for m in grid.get("models") or [dict(base_model, name=base_model.get("name", "smollm2"))]:
        m = {"name": m} if isinstance(m, str) else dict(m)
        models.append(m)
    datasets = grid.get("datasets") or [{}]
    seq_lens = grid.get("seq_lens") or [None]
    estimators = grid.get("estimators") or [{}]
    layers_spec = grid.get("layers", base.get("layers", [-1]))
    cells, names = [], {}
    for m, data, S, est in itertools.product(models, datasets, seq_lens, estimators):
        mlabel = m.get("label") or model_label(m["name"])
        mspec = {k: v for k, v in m.items() if k not in ("label", "layers")}
        lspec = m.get("layers", layers_spec)
        if isinstance(lspec, dict):  # per model, keyed by label or name
            if mlabel not in lspec and m["name"] not in lspec:
                raise ConfigError(f"grid.layers has no entry for model {mlabel!r} (keys: {sorted(lspec)})")
            lspec = lspec.get(mlabel, lspec.get(m["name"]))
        if not (lspec == "all" or isinstance(lspec, (int, list))):
            raise ConfigError(f"layers for model {mlabel!r} must be 'all' or a list of indices, got {lspec!r}")
        data_d = merge_dicts(base.get("data") or {}, {k: v for k, v in data.items() if k != "label"})
        if S is not None:
            data_d["max_seq_len"] = S
        sens_d = merge_dicts(base.get("sensitivity") or {}, {k: v for k, v in est.items() if k != "label"})
        dlabel = data.get("label") or dataset_label(data_d)
        elabel = est.get("label") or estimator_label(sens_d)
        name = f"{mlabel}__S{data_d.get('max_seq_len', 32)}__{_slug(dlabel)}__{_slug(elabel)}"
        trust = bool(merge_dicts(base_model, mspec).get("trust_remote_code", False))
        d = merge_dicts(base, {"model": merge_dicts(base_model, mspec), "data": data_d, "sensitivity": sens_d,
                               "layers": _resolve_layers(lspec, m["name"], trust, resolve_all_layers),
                               "output": {"dir": posixpath.join(sweep.dir, name)}})
        try:
            cfg = RunConfig.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"cell {name}: {exc}") from None
        if name in names:
            raise ConfigError(f"two cells are both named {name!r} (grid entries {names[name]} and "
                              f"{(mlabel, dlabel, S, elabel)}); give the datasets/estimators/models a 'label'")
        names[name] = (mlabel, dlabel, S, elabel)
        cells.append(Cell(name, {"model": mlabel, "model_name": m["name"], "seq_len": cfg.data.max_seq_len,
                                 "dataset": dlabel, "estimator": elabel}, cfg))
    order = {}
    for c in cells:
        order.setdefault(c.model_key, len(order))
    return sorted(cells, key=lambda c: order[c.model_key])  # stable: grid order within a model


# ---------------------------------------------------------------------- generated corpus
def window_corpus(samples: int, words: int) -> tuple[str, int]:
    """Text of ``samples`` lines of ``words`` consecutive words of the bundled corpus (see module doc)."""
    from .corpus import bundled_corpus_path

    stream: list[str] = []
    with open(bundled_corpus_path()) as f:
        for line in f:
            if line.strip():
                stream.extend(str(json.loads(line).get("text") or "").split())
    # the bundled corpus repeats some passages: step the stride down until N windows have distinct
    # first halves (so the texts differ even after truncation to about half the window)
    stride = max(1, (len(stream) - words) // max(samples - 1, 1))
    while True:
        lines, seen = [], set()
        for start in range(0, len(stream) - words + 1, stride):
            key = tuple(stream[start: start + (words + 1) // 2])
            if key not in seen:
                seen.add(key)
                lines.append(" ".join(stream[start: start + words]))
                if len(lines) == samples:
                    return "\n".join(lines) + "\n", stride
        if stride == 1 or len(stream) < words:
            raise ConfigError(f"corpus: the bundled corpus has {len(stream)} words, too few for {samples} distinct "
                              f"windows of {words} words; lower corpus.samples or corpus.words")
        stride -= 1


def _prepare_corpus(sweep: Sweep) -> dict | None:
    if not sweep.corpus:
        return None
    n, w = sweep.corpus["samples"], sweep.corpus["words"]
    text, stride = window_corpus(n, w)
    data = text.encode()
    path = _corpus_path(sweep)
    fs, inner = results.resolve(path)
    if not results.exists(fs, inner) or results.read_bytes(fs, inner) != data:
        results.write_bytes(fs, inner, data)
    distinct = len(set(text.splitlines()))
    return {"path": path, "samples": n, "words": w, "stride": stride, "distinct_texts": distinct,
            "sha256": hashlib.sha256(data).hexdigest()}


def _corpus_path(sweep: Sweep) -> str:
    return posixpath.join(sweep.dir, "corpus", f"bundled-windows-{sweep.corpus['samples']}-{sweep.corpus['words']}.txt")


def _with_corpus(sweep: Sweep, corpus: dict | None) -> Sweep:
    if corpus is None:
        return sweep
    data = merge_dicts(sweep.base.get("data") or {}, {"source": corpus["path"], "kind": "text"})
    return dataclasses.replace(sweep, base=merge_dicts(sweep.base, {"data": data}))


# ---------------------------------------------------------------------- driver memory
class MemoryMonitor:
    """Samples this process's RSS every ``every_s`` seconds (peak, and the RSS at progress points)."""

    def __init__(self, every_s: float = 0.5):
        import psutil

        self.proc = psutil.Process()
        self.every_s = every_s
        self.start_mb = self._rss()
        self.peak_mb = self.start_mb
        self.points: list[dict] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True, name="raysens-rss")

    def _rss(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=2)
        self.peak_mb = max(self.peak_mb, self._rss())

    def mark(self, samples: int) -> None:
        rss = self._rss()
        self.peak_mb = max(self.peak_mb, rss)
        self.points.append({"samples": int(samples), "rss_mb": round(rss, 1)})

    def summary(self) -> dict:
        return {"rss_start_mb": round(self.start_mb, 1), "rss_peak_mb": round(self.peak_mb, 1),
                "rss_end_mb": round(self._rss(), 1),
                "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "rss_by_samples_done": self.points,
                "note": "driver process only (the Ray head's own processes and the actors are not included)"}


# ---------------------------------------------------------------------- running
@dataclass
class _Live:
    """A cell being computed: its plan, run directory, manifest and what is left."""

    cell: Cell
    plan: Any
    rdir: Any
    manifest: dict
    left: int  # units still to arrive
    started: float = 0.0
    load_ids: set = field(default_factory=set)


@dataclass
class SweepSummary:
    dir: str
    manifest: dict  # what was written to <dir>/sweep.json

    @property
    def cells(self) -> list[dict]:
        return self.manifest["cells"]

    def run_dir(self, name: str) -> str:
        return posixpath.join(self.dir, name)

    def load(self, name: str):
        return results.load_run(self.run_dir(name))


def run_sweep(sweep: Sweep, use_ray: bool | None = None) -> SweepSummary:
    """Run every unfinished cell (see the module doc). ``use_ray`` defaults to ``base.cluster.use_ray``."""
    from .distributed.driver import Progress, RunDir, RunError, base_manifest, log, prepare, now_iso

    t0 = time.perf_counter()
    started = now_iso()
    corpus = _prepare_corpus(sweep)
    sweep = _with_corpus(sweep, corpus)
    cells = expand(sweep)
    use_ray = cells[0].config.cluster.use_ray if use_ray is None else use_ray
    # validate everything and open every run directory before computing anything
    skipped, live, status = [], [], {}
    for c in cells:
        m = _read_manifest(c.config.output.dir)
        if m.get("status") == "complete" and m.get("fingerprint") == c.config.fingerprint():
            skipped.append(c)
            status[c.name] = {"status": "complete", "this_run": "skipped (already complete)",
                              "samples": _samples(m)}
            continue
        try:
            plan = prepare(c.config)
            rdir = RunDir(plan)
            rdir.open()
        except Exception as exc:
            raise SweepError(f"cell {c.name}: {exc}") from exc
        todo = rdir.todo()
        live.append(_Live(c, plan, rdir, {**base_manifest(plan, "running", started),
                                          "sweep": {"dir": sweep.dir, "cell": c.name, "axes": c.axes}},
                          len(todo)))
        status[c.name] = {"status": "pending", "this_run": "resumed" if rdir.done else "new"}
    for lv in live:  # like a standalone run: the cell's manifest says "running" until it is finalized
        results.write_manifest(lv.plan.run_dir, lv.manifest)
    total = sum(lv.plan.n_selected for lv in live)
    todo_samples = sum(sum(len(u) for u in lv.rdir.todo()) for lv in live)
    log(f"sweep {sweep.name}: {len(cells)} cells ({len(skipped)} already complete, {len(live)} to run, "
        f"{todo_samples} samples to compute) -> {sweep.dir}")
    smanifest = {"format": "raysens-sweep/1", "name": sweep.name, "dir": sweep.dir, "status": "running",
                 "config": sweep.raw, "corpus": corpus, "timings": {"started": started},
                 "cells": [_cell_entry(c, status[c.name]) for c in cells], "history": _history(sweep)}
    _write_sweep(sweep, smanifest)
    progress = Progress(total, total - todo_samples, live[0].cell.config.output.progress_every_s if live else 5.0)
    groups: dict[tuple, list[_Live]] = {}
    for lv in live:
        groups.setdefault(lv.cell.model_key, []).append(lv)
    failures: list[str] = []
    group_info: list[dict] = []
    session = None
    units_seen = [0]
    mem = MemoryMonitor()
    try:
        with mem:
            if use_ray and any(lv.left for lv in live):
                from .distributed.raypipe import connect

                session = connect(live[0].cell.config.cluster)
                session["resources"] = {k: v for k, v in session["resources"].items() if k in ("CPU", "GPU", "memory")}
            done_samples = [progress.done]

            def finish(lv: _Live, backend: dict) -> None:
                st = status[lv.cell.name]
                try:
                    m = _finalize(lv, backend)
                    st.update(status="complete", samples=_samples(m), wall_s=m["timings"]["wall_s"])
                except RunError as exc:
                    st.update(status="failed", error=str(exc))
                    failures.append(f"{lv.cell.name}: {exc}")
                    log(f"cell {lv.cell.name} failed: {exc}")
                smanifest["cells"] = [_cell_entry(c, status[c.name]) for c in cells]
                _write_sweep(sweep, smanifest)

            for key, group in groups.items():
                tg = time.perf_counter()
                for lv in group:
                    lv.started = tg
                    status[lv.cell.name]["status"] = "running"
                _write_sweep(sweep, smanifest)
                backend: dict = {}

                def on_result(ci: int, unit: int, n: int, payload: bytes, group=group) -> None:
                    lv = group[ci]
                    if not lv.rdir.add(unit, payload):
                        return
                    lv.load_ids.add(_load_id(payload))
                    lv.left -= 1
                    progress.update(n)
                    done_samples[0] += n
                    units_seen[0] += 1
                    if mem.points == [] or done_samples[0] - mem.points[-1]["samples"] >= max(total // 20, 1):
                        mem.mark(done_samples[0])
                    if lv.left == 0:
                        finish(lv, {**backend, "sweep_pass_s": round(time.perf_counter() - tg, 3)})
                    if _TEST_INTERRUPT_AFTER_UNITS and units_seen[0] >= _TEST_INTERRUPT_AFTER_UNITS:
                        raise _TestInterrupt(f"test hook: interrupted after {units_seen[0]} units")

                work = [lv for lv in group if lv.left]
                for lv in group:
                    if not lv.left:  # every partial already there (e.g. killed while finalizing)
                        finish(lv, {"backend": "none (all partials present)"})
                if work:
                    log(f"model {key[0]}: one pass for {len(work)} cell(s): {', '.join(lv.cell.name for lv in work)}")
                    if use_ray:
                        from .distributed.raypipe import CellUnits, run_cells

                        backend.update(backend="ray", address=session["address"],
                                       cluster_resources=session["resources"])
                        info = run_cells([CellUnits(lv.cell.config, lv.plan.corpus, lv.rdir.todo(),
                                                    lv.plan.fingerprint) for lv in work],
                                         lambda ci, u, n, p: on_result(ci, u, n, p, group=work))
                    else:
                        info = _compute_local(work, lambda ci, u, n, p: on_result(ci, u, n, p, group=work),
                                              backend)
                    backend.update(info)
                loads = set().union(*(lv.load_ids for lv in group))
                group_info.append({"model": key[0], "cells": [lv.cell.name for lv in group],
                                   "pass_s": round(time.perf_counter() - tg, 3),
                                   "model_loads": len(loads), "load_ids": sorted(loads),
                                   "num_actors": group[0].cell.config.cluster.num_actors if use_ray else 1})
                for lv in group:
                    if status[lv.cell.name]["status"] == "running":  # a unit produced no result
                        missing = lv.rdir.todo()
                        status[lv.cell.name].update(status="incomplete", missing_units=len(missing))
                        failures.append(f"{lv.cell.name}: {len(missing)} units produced no result")
            mem.mark(done_samples[0])
    except BaseException as exc:
        smanifest.update(status="interrupted", error=f"{type(exc).__name__}: {exc}",
                         cells=[_cell_entry(c, status[c.name]) for c in cells], groups=group_info,
                         driver_memory=mem.summary())
        _write_sweep(sweep, smanifest)
        raise
    finally:
        if session and session["started_here"]:
            import ray

            ray.shutdown()
    wall = time.perf_counter() - t0
    computed = sum(st.get("samples", {}).get("computed", 0) for st in status.values())
    smanifest.update(
        status="complete" if not failures else "failed",
        cells=[_cell_entry(c, status[c.name]) for c in cells], groups=group_info,
        samples={"computed_all_cells": computed, "computed_this_run": progress.done - progress.start},
        timings={"started": started, "finished": now_iso(), "wall_s": round(wall, 3),
                 "samples_per_s_this_run": round((progress.done - progress.start) / wall, 3) if wall else None},
        driver_memory=mem.summary(), backend="ray" if use_ray else "local")
    _write_sweep(sweep, smanifest)
    log(f"sweep {sweep.name}: {len(cells) - len(failures)}/{len(cells)} cells complete in {wall:.1f}s; "
        f"driver peak RSS {mem.peak_mb:.0f} MiB -> {sweep.dir}/sweep.json")
    if failures:
        raise SweepError(f"{len(failures)} cell(s) did not complete (rerun the sweep to retry them): "
                         + "; ".join(failures))
    return SweepSummary(sweep.dir, smanifest)


def _compute_local(work: list[_Live], on_result, backend: dict) -> dict:
    """The in-process path: one model load for the group, one worker per cell over it."""
    from .distributed.work import UnitWorker, get_tokenizer, tokenize_unit

    shared: dict = {}
    m = work[0].cell.config.model
    workers = [UnitWorker(m.name, m.trust_remote_code, m.device, lv.cell.config.sensitivity.to_dict(),
                          list(lv.cell.config.layers), lv.cell.config.data.max_seq_len, lv.plan.fingerprint,
                          shared=shared) for lv in work]
    backend.update(backend="local", device=workers[0].device)
    tok = get_tokenizer(m.name, m.trust_remote_code)
    for ci, lv in enumerate(work):
        d = lv.cell.config.data
        for ids in lv.rdir.todo():
            unit = tokenize_unit(ids, lv.plan.corpus.texts(ids), tok, d.max_seq_len, d.min_tokens, d.add_special_tokens)
            on_result(ci, unit["unit"], len(ids), workers[ci].process(unit))
    return {"backend": "local", "device": workers[0].device}


def _finalize(lv: _Live, backend: dict) -> dict:
    from .distributed.driver import finalize

    rdir = lv.rdir
    dt = time.perf_counter() - lv.started
    timings = {"wall_s": round(dt, 3), "compute_wall_s": round(dt, 3), "samples_this_run": rdir.samples_written,
               "samples_per_s": round(rdir.samples_written / dt, 4) if rdir.samples_written and dt > 0 else None,
               "note": "the cell shares its model's pass with the model's other cells: wall time from that "
                       "pass's start to this cell's last unit"}
    m = finalize(lv.plan, rdir, lv.manifest, timings, {**backend, "model_load_ids": sorted(lv.load_ids)})
    s = m["samples"]
    print(f"cell {lv.cell.name}: {s['computed']} samples computed, {s['skipped']} skipped -> {lv.plan.run_dir}",
          flush=True)
    return m


def _load_id(payload: bytes) -> str | None:
    from .distributed.work import decode_partial

    return decode_partial(payload).meta.get("load_id")


def _samples(m: dict) -> dict:
    s = m.get("samples", {})
    return {k: s.get(k) for k in ("total", "computed", "skipped")}


def _cell_entry(c: Cell, st: dict) -> dict:
    return {"name": c.name, "run_dir": c.config.output.dir, "axes": c.axes, "layers": list(c.config.layers),
            "fingerprint": c.config.fingerprint(), **st}


def _read_manifest(run_dir: str) -> dict:
    fs, base = results.resolve(run_dir)
    if not results.exists(fs, posixpath.join(base, "manifest.json")):
        return {}
    try:
        return results.read_manifest(run_dir)
    except ValueError:
        return {}


def _history(sweep: Sweep) -> list[dict]:
    """Earlier invocations of this sweep (from its sweep.json): what each computed, how fast, memory."""
    old = _read_json(posixpath.join(sweep.dir, "sweep.json"))
    if not old.get("timings"):
        return []
    keep = ("status", "timings", "samples", "backend", "groups", "driver_memory", "error")
    return old.get("history", []) + [{k: old[k] for k in keep if k in old}]


def _read_json(path: str) -> dict:
    fs, inner = results.resolve(path)
    if not results.exists(fs, inner):
        return {}
    try:
        return json.loads(results.read_bytes(fs, inner))
    except ValueError:
        return {}


def _write_sweep(sweep: Sweep, m: dict) -> None:
    fs, base = results.resolve(sweep.dir)
    results.write_bytes(fs, posixpath.join(base, "sweep.json"), json.dumps(m, indent=1, default=str).encode())


# ---------------------------------------------------------------------- command line
USAGE = """usage: raysens sweep SWEEP.yaml [--key=value ...] [--dry-run]

Run every cell of a sweep (see jobs/configs/sweep_*.yaml) in one job; rerunning with the same dir
skips finished cells and resumes unfinished ones. Overrides: --dir=..., --grid.seq_lens=[16],
--corpus.samples=1000, and run-config keys applied to every cell (--data.limit=100,
--cluster.num_actors=2, --address=HOST:PORT). --dry-run lists the cells and exits.
"""


def main_sweep(argv: list[str]) -> int:
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    positional = [a for a in argv if not a.startswith("--")]
    if len(positional) != 1:
        print(USAGE, file=sys.stderr)
        print(f"raysens sweep: error: one SWEEP config file expected, got {positional}", file=sys.stderr)
        return 2
    from .cli import _errors

    config_error, run_errors = _errors()
    try:
        sweep = load_sweep(positional[0], [a for a in argv if a.startswith("--")])
        if dry:
            for c in expand(_with_corpus(sweep, {"path": _corpus_path(sweep)} if sweep.corpus else None)):
                print(f"{c.name}\tlayers={list(c.config.layers)}\t-> {c.config.output.dir}")
            return 0
        run_sweep(sweep)
    except config_error as exc:
        print(f"raysens sweep: config error: {exc}", file=sys.stderr)
        return 2
    except (SweepError, *run_errors) as exc:
        print(f"raysens sweep: error: {exc}", file=sys.stderr)
        return 1
    return 0
