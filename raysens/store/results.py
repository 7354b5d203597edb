"""Run directories: manifest + per-layer statistics in open formats, on any ``pyarrow.fs`` filesystem.

Layout of a run directory (a local path or a URI such as ``s3://bucket/run``, ``gs://…``,
``file:///shared/run``)::

    manifest.json               config, versions, model identity, samples, timings, estimator, seed
    stats/layer_007.npz         per layer: statistics arrays [pos_out, pos_in] + the Welford state
    stats/layer_007.parquet     the same statistics as a long table (layer, i, j, mean, var, std, var_corrected, std_corrected, probe_noise, cell_count, max, max_sample_id, min, sum, max_share, q25, median, q75)
    partials/…                  persisted partial states (``partials.py``, ``rundir.py``)
    plots/*.png                 heatmaps and summaries

``.npz`` keys: ``mean var std var_corrected std_corrected probe_noise cell_count count``; what drives a
cell (docs/DESIGN.md §2.1–2.2): ``max max_sample_id min sum max_share q25 median q75`` per cell and
``row_max row_max_sample_id row_share`` per output row; and the lossless state ``state_<key>`` for every
key of ``CellStats.to_arrays`` (``state_count state_mean state_m2 state_noise_sum state_samples``,
``state_max state_max_id …``, ``state_s1_top state_s1_limbs …``, ``state_hist_counts …``). numpy and
pyarrow read everything without raysens installed. Files written before the extremes existed load with
those fields None; files written before issue 18 load with their Welford moments as ``state``.
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

from ..stats.cells import NEW_STAT_KEYS, CellStats
from ..stats.welford import WelfordState
from .fs import exists, read_bytes, resolve, write_bytes  # noqa: F401  (re-exported: results.resolve etc.)
from .npz import npz_bytes

STAT_KEYS = ("mean", "var", "std", "var_corrected", "std_corrected", "probe_noise", "cell_count")
CELL_STAT_KEYS = ("max", "max_sample_id", "min", "sum", "max_share", "q25", "median", "q75")  # also Parquet columns
ROW_STAT_KEYS = ("row_max", "row_max_sample_id", "row_share")  # [pos_out]


def layer_file(layer: int, ext: str = "npz") -> str:
    return f"stats/layer_{int(layer):03d}.{ext}"


def write_layer_stats(run_dir: str, layer: int, state: CellStats | WelfordState, path: str | None = None) -> None:
    """Persist one layer's statistics (npz + parquet) and its lossless state (a plain
    ``WelfordState`` writes only the moment statistics). ``path``: the npz's path in the run directory
    (default ``layer_file(layer)``; the parquet beside it: a paired run's side b, ``paired_results``)."""
    fs, base = resolve(run_dir)
    npz_path = path or layer_file(layer)
    pq_path = npz_path[:-len(".npz")] + ".parquet" if npz_path.endswith(".npz") else npz_path + ".parquet"
    stats = state.statistics()
    cols = STAT_KEYS + (CELL_STAT_KEYS if isinstance(state, CellStats) else ())
    arrays = {k: stats[k] for k in cols + (ROW_STAT_KEYS + ("quantile_bound",) if isinstance(state, CellStats) else ())}
    arrays["count"] = np.asarray(stats["count"], np.int64)
    plain = state.to_arrays(copy=False) if isinstance(state, CellStats) else state.to_arrays()  # written, not kept
    arrays.update({f"state_{k}": v for k, v in plain.items()})
    # zlib level 1 (store/npz.py) since issue 18: 5× smaller at long S (run dir ≤ 2 GB at S = 512)
    write_bytes(fs, posixpath.join(base, npz_path), npz_bytes(arrays))
    write_cell_table(run_dir, pq_path, layer, {k: stats[k] for k in cols})


def write_cell_table(run_dir: str, path: str, layer: int, cols: dict[str, np.ndarray]) -> None:
    """The per-cell ``[pos_out, pos_in]`` arrays ``cols`` as a long Parquet table (``layer, i, j, <cols>``)
    at ``path`` in the run directory (a layer's stats, a paired run's differences)."""
    fs, base = resolve(run_dir)
    s = next(iter(cols.values())).shape[0]
    ii, jj = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    table = pa.table({"layer": np.full(s * s, layer, np.int32), "i": ii.ravel().astype(np.int32),
                      "j": jj.ravel().astype(np.int32), **{k: np.asarray(v).ravel() for k, v in cols.items()}})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(fs, posixpath.join(base, path), sink.getvalue().to_pybytes())


def write_manifest(run_dir: str, manifest: dict) -> None:
    fs, base = resolve(run_dir)
    write_bytes(fs, posixpath.join(base, "manifest.json"), json.dumps(manifest, indent=2, default=str).encode())


def read_manifest(run_dir: str) -> dict:
    fs, base = resolve(run_dir)
    p = posixpath.join(base, "manifest.json")
    if not exists(fs, p):
        raise FileNotFoundError(f"load_run: {run_dir!r} has no manifest.json (not a raysens run directory?)")
    m = json.loads(read_bytes(fs, p))
    if not isinstance(m, dict):
        raise ValueError(f"{run_dir!r}: manifest.json is not a raysens manifest (a JSON {type(m).__name__}, "
                         "not an object)")
    return m


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
    state: CellStats | WelfordState  # lossless accumulator state (merge more data into it)
    # what drives a cell (None for files written before they existed); docs/DESIGN.md §2.1-2.2
    max: np.ndarray | None = None  # largest per-sample value (NaN where empty)
    max_sample_id: np.ndarray | None = None  # its sample_id (smallest on ties; -1 where empty)
    min: np.ndarray | None = None  # smallest per-sample value
    sum: np.ndarray | None = None  # sum over samples
    max_share: np.ndarray | None = None  # max / sum: the share of the cell's largest sample
    q25: np.ndarray | None = None  # quantiles from the log histogram (relative error <= quantile_bound)
    median: np.ndarray | None = None
    q75: np.ndarray | None = None
    quantile_bound: np.ndarray | None = None  # per cell: the quantiles' relative error bound (files since issue 18)
    row_max: np.ndarray | None = None  # [pos_out] largest per-sample row total Σ_j A_ij
    row_max_sample_id: np.ndarray | None = None  # [pos_out] its sample_id
    row_share: np.ndarray | None = None  # [pos_out] row_max / Σ_j sum: the row's share of its largest sample


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


def load_layer(run_dir: str, layer: int, path: str | None = None) -> LayerStats:
    """One layer's statistics file (``path``: the npz's path in the run directory, default ``layer_file(layer)``)."""
    fs, base = resolve(run_dir)
    raw = np.load(io.BytesIO(read_bytes(fs, posixpath.join(base, path or layer_file(layer)))), allow_pickle=False)
    st = {k[len("state_"):]: raw[k] for k in raw.files if k.startswith("state_")}
    if "hist_counts" in st:
        state = CellStats.from_arrays(st)
    else:  # written before issue 18 (Welford moments, maybe a fixed-bin histogram): the moments are the state
        state = WelfordState.from_arrays({k: st[k] for k in ("count", "mean", "m2", "noise_sum", "samples")})
    extra = {k: raw[k] for k in NEW_STAT_KEYS if k in raw.files}
    return LayerStats(layer, *(raw[k] for k in STAT_KEYS), int(raw["count"]), state, **extra)


def load_run(run_dir: str) -> RunResult:
    """Load ``manifest.json`` and every ``stats/layer_*.npz`` of a run directory."""
    manifest = read_manifest(run_dir)
    fs, base = resolve(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(posixpath.join(base, "stats"), allow_not_found=True))
    layers = sorted(int(posixpath.basename(i.path)[6:9]) for i in infos
                    if i.path.endswith(".npz") and posixpath.basename(i.path).startswith("layer_"))
    return RunResult(str(run_dir), manifest, {L: load_layer(run_dir, L) for L in layers})
