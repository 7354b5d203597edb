"""A paired run's per-layer files (issue 29): both sides' statistics and the differences, in open formats.

Layout in the run directory (side a is the run's ``model``: any tool that reads ``stats/layer_LLL.*``
reads a paired run as a run of model a)::

    stats/layer_LLL.npz|.parquet       side a: exactly ``results.write_layer_stats`` of ``state.a``
    stats/b/layer_LLL.npz|.parquet     side b: the same format
    stats/diff/layer_LLL.npz           the differences: every array of ``PairedCells.differences(fdr)``
                                       (n_pairs, mean_diff, var_diff, se_diff, t, p, q, significant, n_log,
                                       mean_log_ratio, var_log_ratio, se_log_ratio, se_unpaired, se_ratio;
                                       0-d fdr, count) and the lossless ``DiffStats`` as ``state_<DIFF key>``
    stats/diff/layer_LLL.parquet       the per-cell arrays as a long table (layer, i, j, …)

numpy and pyarrow read them without raysens. ``read_paired_state`` rebuilds the whole ``PairedCells``
(e.g. to recompute the differences at another FDR). numpy and pyarrow only.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

import numpy as np

from ..stats.cells import CellStats
from ..stats.paired import DIFF_KEYS, DiffStats, PairedCells
from . import results
from .fs import read_bytes, resolve, write_bytes
from .npz import npz_bytes

B_FILE = "stats/b/layer_{:03d}.npz"
DIFF_FILE = "stats/diff/layer_{:03d}.npz"
SCALAR_KEYS = ("fdr", "count")  # 0-d arrays of the diff file


def b_file(layer: int, ext: str = "npz") -> str:
    return B_FILE.format(int(layer))[:-len("npz")] + ext


def diff_file(layer: int, ext: str = "npz") -> str:
    return DIFF_FILE.format(int(layer))[:-len("npz")] + ext


def write_paired_layer(run_dir: str, layer: int, state: PairedCells, fdr: float = 0.05) -> None:
    """Write side a (``stats/layer_LLL``), side b (``stats/b/layer_LLL``) and the differences at
    false-discovery rate ``fdr`` (``stats/diff/layer_LLL``), npz + parquet each (see the module doc)."""
    if not isinstance(state, PairedCells):
        raise TypeError(f"write_paired_layer: state must be a PairedCells (a paired run's state), "
                        f"got {type(state).__name__}")
    results.write_layer_stats(run_dir, layer, state.a)
    results.write_layer_stats(run_dir, layer, state.b, path=b_file(layer))
    diffs = state.differences(fdr)
    arrays = dict(diffs)
    arrays.update({f"state_{k}": v for k, v in state.d.to_arrays(copy=False).items()})
    fs, base = resolve(run_dir)
    write_bytes(fs, posixpath.join(base, diff_file(layer)), npz_bytes(arrays))
    results.write_cell_table(run_dir, diff_file(layer, "parquet"), layer,
                             {k: v for k, v in diffs.items() if k not in SCALAR_KEYS})


def read_diff_stats(run_dir: str, layer: int) -> dict[str, Any]:
    """The diff npz of ``layer`` as arrays (per cell ``[pos_out, pos_in]``; ``fdr`` a float and ``count``
    an int) plus ``"state"``: the lossless ``DiffStats``. Raises FileNotFoundError naming the file
    when the run has no differences for that layer (not a paired run, or not finalized)."""
    fs, base = resolve(run_dir)
    path = posixpath.join(base, diff_file(layer))
    try:
        payload = read_bytes(fs, path)
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"read_diff_stats: {run_dir!r} has no {diff_file(layer)} (not a paired run, or "
                                f"layer {layer} not finalized): {exc}") from None
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    out: dict[str, Any] = {k: v for k, v in raw.items() if not k.startswith("state_")}
    out["fdr"], out["count"] = float(raw["fdr"]), int(raw["count"])
    out["state"] = DiffStats.from_arrays({k: raw[f"state_{k}"] for k in DIFF_KEYS})
    return out


def read_side(run_dir: str, layer: int, side: str) -> results.LayerStats:
    """Side ``"a"`` (``stats/layer_LLL.npz``) or ``"b"`` (``stats/b/layer_LLL.npz``) of a paired run's
    layer, like ``results.load_layer``."""
    if side not in ("a", "b"):
        raise ValueError(f"read_side: side must be 'a' or 'b', got {side!r}")
    return results.load_layer(run_dir, layer, None if side == "a" else b_file(layer))


def read_paired_state(run_dir: str, layer: int) -> PairedCells:
    """The lossless ``PairedCells`` of a layer, rebuilt from the three files (validated: the same pairs)."""
    a, b = (read_side(run_dir, layer, s).state for s in "ab")
    if not (isinstance(a, CellStats) and isinstance(b, CellStats)):
        raise ValueError(f"read_paired_state: {run_dir!r} layer {layer}: a side's file holds no CellStats state")
    return PairedCells.joined(a, b, read_diff_stats(run_dir, layer)["state"], "read_paired_state")
