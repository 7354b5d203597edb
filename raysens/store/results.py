"""Run directories: manifest + per-layer statistics in open formats, on any ``pyarrow.fs`` filesystem.

Layout of a run directory (a local path or a URI such as ``s3://bucket/run``, ``gs://…``,
``file:///shared/run``)::

    manifest.json               config, versions, model identity, samples, timings, estimator, seed
    stats/layer_007.npz         per layer: statistics arrays [pos_out, pos_in] + the Welford state
    stats/layer_007.parquet     the same statistics as a long table (layer, i, j, mean, var, std, var_corrected, std_corrected, probe_noise, cell_count)
    partials/…                  persisted partial states (``partials.py``, ``rundir.py``)
    plots/*.png                 heatmaps and summaries

``.npz`` keys: ``mean var std var_corrected std_corrected probe_noise cell_count count`` and
``state_count state_mean state_m2 state_noise_sum state_samples`` (lossless Welford state). numpy and
pyarrow read everything without raysens installed.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..core.welford import WelfordState
from .fs import exists, read_bytes, resolve, write_bytes  # noqa: F401  (re-exported: results.resolve etc.)

STAT_KEYS = ("mean", "var", "std", "var_corrected", "std_corrected", "probe_noise", "cell_count")


def layer_file(layer: int, ext: str = "npz") -> str:
    return f"stats/layer_{int(layer):03d}.{ext}"


def write_layer_stats(run_dir: str, layer: int, state: WelfordState) -> None:
    """Persist one layer's statistics (npz + parquet) and its lossless state."""
    fs, base = resolve(run_dir)
    stats = state.statistics()
    arrays = {k: stats[k] for k in STAT_KEYS}
    arrays["count"] = np.asarray(stats["count"], np.int64)
    arrays.update({f"state_{k}": v for k, v in state.to_arrays().items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(fs, posixpath.join(base, layer_file(layer)), buf.getvalue())
    s = state.shape[0]
    ii, jj = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    table = pa.table({"layer": np.full(s * s, layer, np.int32), "i": ii.ravel().astype(np.int32),
                      "j": jj.ravel().astype(np.int32), **{k: stats[k].ravel() for k in STAT_KEYS}})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(fs, posixpath.join(base, layer_file(layer, "parquet")), sink.getvalue().to_pybytes())


def write_manifest(run_dir: str, manifest: dict) -> None:
    fs, base = resolve(run_dir)
    write_bytes(fs, posixpath.join(base, "manifest.json"), json.dumps(manifest, indent=2, default=str).encode())


def read_manifest(run_dir: str) -> dict:
    fs, base = resolve(run_dir)
    p = posixpath.join(base, "manifest.json")
    if not exists(fs, p):
        raise FileNotFoundError(f"load_run: {run_dir!r} has no manifest.json (not a raysens run directory?)")
    return json.loads(read_bytes(fs, p))


@dataclass
class LayerStats:
    """Dataset statistics of one target layer; arrays are ``[pos_out, pos_in]``."""

    layer: int
    mean: np.ndarray  # E[A_ij]; NaN where no sample reached the cell
    var: np.ndarray  # unbiased variance over samples (raw, includes probe noise); NaN where n < 2
    std: np.ndarray
    var_corrected: np.ndarray  # var minus the mean probe variance (hutchinson), clamped at 0
    std_corrected: np.ndarray
    probe_noise: np.ndarray  # mean per-sample probe variance of the estimate (0 unless K ≥ 2)
    cell_count: np.ndarray  # samples per cell
    count: int  # samples folded in
    state: WelfordState  # lossless accumulator state (merge more data into it)


@dataclass
class RunResult:
    """A loaded run directory."""

    path: str
    manifest: dict
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def __getitem__(self, layer: int) -> LayerStats:
        if layer not in self.layers:
            raise KeyError(f"RunResult: layer {layer} not in this run (layers: {sorted(self.layers)})")
        return self.layers[layer]


def load_layer(run_dir: str, layer: int) -> LayerStats:
    fs, base = resolve(run_dir)
    raw = np.load(io.BytesIO(read_bytes(fs, posixpath.join(base, layer_file(layer)))))
    state = WelfordState.from_arrays({k[len("state_"):]: raw[k] for k in raw.files if k.startswith("state_")})
    return LayerStats(layer, *(raw[k] for k in STAT_KEYS), int(raw["count"]), state)


def load_run(run_dir: str) -> RunResult:
    """Load ``manifest.json`` and every ``stats/layer_*.npz`` of a run directory."""
    manifest = read_manifest(run_dir)
    fs, base = resolve(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(posixpath.join(base, "stats"), allow_not_found=True))
    layers = sorted(int(posixpath.basename(i.path)[6:9]) for i in infos
                    if i.path.endswith(".npz") and posixpath.basename(i.path).startswith("layer_"))
    return RunResult(str(run_dir), manifest, {L: load_layer(run_dir, L) for L in layers})
