"""Sweep configs: a grid of runs (models × sequence lengths × datasets × estimators) and its points.

    from raysens.run.grid import load_sweep, expand
    sweep = load_sweep("jobs/configs/sweep_tiny_10k.yaml", ["--grid.seq_lens=[16]"])
    for point in expand(sweep): print(point.name, point.config.layers)

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
      paired: [null, {random_init: true, label: vs-random}]   # paired runs (issue 29): over base.paired; null: unpaired
    corpus: {samples: 10000, words: 24}   # optional: generate the corpus (see below)

Every axis is optional (one value: the base's). The sweep's *points* are the cartesian product, in
the order models, datasets, seq_lens, estimators, paired (a ``paired:`` section in ``base`` makes every
point paired; the ``paired`` axis makes each entry a point: ``null`` an ordinary run, a mapping a
``PairedConfig`` merged over ``base.paired``, with an optional ``label`` for the point's name); each point is one ``RunConfig`` (one run
directory) whose layers all share one forward pass. Unknown keys are errors at every level, as in
run configs. (A "cell" in raysens is always a matrix entry (i, j); a grid point is a "point".)

``corpus: {samples: N, words: W}`` writes ``<dir>/corpus/bundled-windows-N-W.txt``: N lines, each
W consecutive words of the bundled corpus (rows concatenated in order), starting every ``stride``
words (stride = (total words − W) // (N − 1), lowered if needed), skipping windows whose first
half repeats an earlier one (the corpus repeats a few passages): N different texts, N distinct
sample_ids. The sweep uses it as ``base.data`` (kind text). It exists so a scaled-down sweep
can run 10,000 samples here, where the bundled corpus has 1,377 rows; real sweeps point
``data.source`` at a real dataset. Running a sweep: ``raysens.run.sweep``. No torch, no Ray.

Why this module is long: the sweep file's schema, its checks and its expansion into points, with the
per-point corpus window those points need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._keys import unknown_keys
from ..store import results
from ..config import ConfigError, RunConfig, merge_dicts, parse_overrides, read_yaml_mapping

SWEEP_KEYS = ("name", "dir", "base", "grid", "corpus")
GRID_KEYS = ("models", "seq_lens", "datasets", "estimators", "layers", "paired")
MODEL_KEYS = ("name", "label", "layers", "trust_remote_code", "device")
CORPUS_KEYS = ("samples", "words")


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
class Point:
    """One grid point of the sweep: one run."""

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
    named = unknown_keys(d, known, f"{where}." if where != "sweep" else "")
    if named:
        n = len(set(d) - set(known))
        raise ConfigError(f"unknown sweep key{'s' if n > 1 else ''} {named}; known keys in {where}: {', '.join(known)}")


def _as_list(v: Any, key: str) -> list:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{key} must be a non-empty list, got {v!r}")
    return v


def sweep_from_dict(d: dict) -> Sweep:
    """Validate a sweep dict (unknown keys, types, every point's run config). Writes nothing."""
    _check_keys(d, SWEEP_KEYS, "sweep")
    name = d.get("name") or "sweep"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"name must be letters, digits, '.', '_' or '-', got {name!r}")
    base = d.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"base must be a mapping of run config sections, got {base!r}")
    if (base.get("output") or {}).get("dir") is not None:
        raise ConfigError("base.output.dir must not be set: each point writes <dir>/<point name>; set the sweep's dir")
    grid = d.get("grid") or {}
    _check_keys(grid, GRID_KEYS, "grid")
    for k in ("models", "seq_lens", "datasets", "estimators", "paired"):
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
    for i, e in enumerate(grid.get("paired", [])):
        if e is not None and not isinstance(e, dict):
            raise ConfigError(f"grid.paired[{i}] must be a paired section (a mapping) or null (unpaired), got {e!r}")
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
    expand(sw, resolve_all_layers=False)  # every point must be a valid run config
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


def paired_label(p: dict | None) -> str:
    """A grid point's name part for its ``paired`` entry (``unpaired`` for null)."""
    if not p:
        return "unpaired"
    if p.get("label"):
        return str(p["label"])
    if p.get("random_init"):
        return f"vs-random{p.get('init_seed') or 0}"
    if p.get("scale"):
        s = p["scale"] or {}
        return f"vs-{s.get('module')}-x{s.get('factor')}"
    if p.get("model"):
        m = p["model"]
        name = model_label(m.get("name", "") if isinstance(m, dict) else str(m))
        return f"vs-{name}" + (f"-{p['precision']}" if p.get("precision") else "")
    if p.get("precision"):
        return f"vs-{p['precision']}"
    return "vs-same"


def _resolve_layers(spec: Any, model: str, trust_remote_code: bool, resolve_all: bool) -> list:
    if spec == "all":
        if not resolve_all:
            return [-1]  # placeholder while validating; resolved from the model config at run time
        from ..core.models import load_tokenizer_and_config

        _, mcfg = load_tokenizer_and_config(model, trust_remote_code=trust_remote_code)
        return list(range(1, int(mcfg.num_hidden_layers) + 1))  # hidden_states 1..n: after each block
    return spec


def expand(sweep: Sweep, resolve_all_layers: bool = True) -> list[Point]:
    """The points of a sweep, in run order (grouped by model). ``layers: all`` is resolved from each
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
    paired_axis = "paired" in grid
    paireds = grid.get("paired") or [None] if paired_axis else [base.get("paired")]
    points, names = [], {}
    for m, data, S, est, pair in itertools.product(models, datasets, seq_lens, estimators, paireds):
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
        plabel = None
        if paired_axis:  # the axis entry over base.paired (null: an ordinary run)
            plabel = paired_label(pair)
            name += f"__{_slug(plabel)}"
            pair = None if pair is None else merge_dicts(base.get("paired") or {},
                                                         {k: v for k, v in pair.items() if k != "label"})
        elif pair:
            plabel = paired_label(pair)
        trust = bool(merge_dicts(base_model, mspec).get("trust_remote_code", False))
        d = merge_dicts(base, {"model": merge_dicts(base_model, mspec), "data": data_d, "sensitivity": sens_d,
                               "layers": _resolve_layers(lspec, m["name"], trust, resolve_all_layers),
                               "output": {"dir": posixpath.join(sweep.dir, name)}})
        d["paired"] = pair
        try:
            cfg = RunConfig.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"point {name}: {exc}") from None
        if name in names:
            raise ConfigError(f"two points are both named {name!r} (grid entries {names[name]} and "
                              f"{(mlabel, dlabel, S, elabel)}); give the datasets/estimators/models a 'label'")
        names[name] = (mlabel, dlabel, S, elabel)
        points.append(Point(name, {"model": mlabel, "model_name": m["name"], "seq_len": cfg.data.max_seq_len,
                                 "dataset": dlabel, "estimator": elabel,
                                 **({"paired": plabel} if plabel is not None else {})}, cfg))
    order = {}
    for c in points:
        order.setdefault(c.model_key, len(order))
    return sorted(points, key=lambda c: order[c.model_key])  # stable: grid order within a model


# ---------------------------------------------------------------------- generated corpus
def window_corpus(samples: int, words: int) -> tuple[str, int]:
    """Text of ``samples`` lines of ``words`` consecutive words of the bundled corpus (see module doc)."""
    from ..corpus.reader import bundled_corpus_path

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


def prepare_corpus(sweep: Sweep) -> dict | None:
    if not sweep.corpus:
        return None
    n, w = sweep.corpus["samples"], sweep.corpus["words"]
    text, stride = window_corpus(n, w)
    data = text.encode()
    path = corpus_path(sweep)
    fs, inner = results.resolve(path)
    if not results.exists(fs, inner) or results.read_bytes(fs, inner) != data:
        results.write_bytes(fs, inner, data)
    distinct = len(set(text.splitlines()))
    return {"path": path, "samples": n, "words": w, "stride": stride, "distinct_texts": distinct,
            "sha256": hashlib.sha256(data).hexdigest()}


def corpus_path(sweep: Sweep) -> str:
    return posixpath.join(sweep.dir, "corpus", f"bundled-windows-{sweep.corpus['samples']}-{sweep.corpus['words']}.txt")


def with_corpus(sweep: Sweep, corpus: dict | None) -> Sweep:
    if corpus is None:
        return sweep
    data = merge_dicts(sweep.base.get("data") or {}, {"source": corpus["path"], "kind": "text"})
    return dataclasses.replace(sweep, base=merge_dicts(sweep.base, {"data": data}))
