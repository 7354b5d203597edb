"""Per-sample export (``output.per_sample: true``; docs/DESIGN.md §6.5): every computed sample's
``[S, S]`` map per target layer, float32, in Parquet.

One file per work unit, named by the unit's first sample_id like its partial:
``<run>/per_sample/unit_<first sample_id:010d>.parquet``. The driver writes it at finalize from the
unit's partial (which carries the maps), atomically, overwriting what is there, so retries and
resumes never duplicate a sample. Columns, one row per (sample, layer):

| column | type | content |
|---|---|---|
| ``sample_id`` | int64 | the corpus row |
| ``layer`` | int32 | ``hidden_states`` index |
| ``length`` | int32 | the sample's token count n (after truncation) |
| ``values`` | list<float32> | its ``[n, n]`` map ``A_ij``, row-major: ``A_ij = values[i·n + j]`` |

Size: ``4·n²`` bytes of values per sample and layer before Parquet's compression (4 KiB at n = 32,
16 KiB at n = 64; causal zeros compress). numpy / pyarrow read it without raysens. numpy/pyarrow only.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .fs import exists, read_bytes, resolve, write_bytes

PER_SAMPLE = "per_sample"
SCHEMA = pa.schema([("sample_id", pa.int64()), ("layer", pa.int32()), ("length", pa.int32()),
                    ("values", pa.list_(pa.float32()))])


def unit_file(unit: int) -> str:
    return f"{PER_SAMPLE}/unit_{int(unit):010d}.parquet"


def unit_table(sample_ids, maps: dict[int, np.ndarray]) -> pa.Table:
    """``maps``: layer -> float32 ``[n_samples, S, S]`` (NaN where masked, as in a partial)."""
    rows: dict[str, list] = {"sample_id": [], "layer": [], "length": [], "values": []}
    for L in sorted(maps):
        for sid, a in zip(sample_ids, np.asarray(maps[L], np.float32)):
            n = int(np.isfinite(np.diagonal(a)).sum())
            rows["sample_id"].append(int(sid))
            rows["layer"].append(int(L))
            rows["length"].append(n)
            rows["values"].append(np.ascontiguousarray(a[:n, :n]).ravel())
    return pa.table({"sample_id": pa.array(rows["sample_id"], pa.int64()), "layer": pa.array(rows["layer"], pa.int32()),
                     "length": pa.array(rows["length"], pa.int32()),
                     "values": pa.array(rows["values"], pa.list_(pa.float32()))}, schema=SCHEMA)


def write_unit(run_dir: str, unit: int, sample_ids, maps: dict[int, np.ndarray]) -> str:
    """Write (or overwrite) one unit's per-sample file; returns its path relative to the run."""
    fs, base = resolve(run_dir)
    sink = pa.BufferOutputStream()
    pq.write_table(unit_table(sample_ids, maps), sink)
    write_bytes(fs, posixpath.join(base, unit_file(unit)), sink.getvalue().to_pybytes())
    return unit_file(unit)


def read_per_sample(run_dir: str) -> pa.Table:
    """Every per-sample row of a run (empty table when the run has none), in sample_id order."""
    fs, base = resolve(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(posixpath.join(base, PER_SAMPLE), allow_not_found=True))
    names = sorted(i.path for i in infos if i.path.endswith(".parquet"))
    tables = [pq.read_table(pa.BufferReader(read_bytes(fs, p))) for p in names]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def sample_map(run_dir: str, sample_id: int, layer: int) -> np.ndarray | None:
    """One sample's ``[n, n]`` float32 map from the per-sample export, or None when not exported."""
    fs, base = resolve(run_dir)
    if not exists(fs, posixpath.join(base, PER_SAMPLE)):
        return None
    t = read_per_sample(run_dir).to_pydict()
    for sid, L, n, v in zip(t["sample_id"], t["layer"], t["length"], t["values"]):
        if sid == int(sample_id) and L == int(layer):
            return np.asarray(v, np.float32).reshape(n, n)
    return None
