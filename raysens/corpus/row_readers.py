"""Reading selected rows of a columnar corpus without loading its text column.

- Parquet (one file or several, in name order): row counts come from the file footers; the
  sorted ids are mapped to row groups by cumulative offsets, and only the text column of the row
  groups that hold selected rows is read (``ParquetFile.read_row_group``), then ``take``. The last
  row group read is kept (units are consecutive ranges of sorted ids, so neighbouring units often
  share it): a process holds at most one row group's text column.
- Hugging Face ``datasets`` (``load_from_disk`` / ``load_dataset``): Arrow tables memory-mapped by
  ``datasets`` itself; ``ds[ids]`` gathers only the selected rows.

numpy / pyarrow only (``datasets`` is imported by the caller).
"""

from __future__ import annotations

import numpy as np
import pyarrow.fs as pafs


class ParquetRows:
    """Rows of one text column of Parquet ``files`` (on ``fs``), looked up by global row index."""

    def __init__(self, fs: pafs.FileSystem, files: list[str], column: str):
        import pyarrow.parquet as pq

        self.fs, self.files, self.column = fs, list(files), column
        self._pf: dict[int, object] = {}
        starts, where = [], []  # global first row of every row group; (file, row group) of each
        total = 0
        for fi, path in enumerate(self.files):
            pf = pq.ParquetFile(fs.open_input_file(path))
            md = pf.metadata
            for rg in range(md.num_row_groups):
                starts.append(total), where.append((fi, rg))
                total += md.row_group(rg).num_rows
            self._pf[fi] = pf
        self.n_rows = total
        self._starts = np.asarray(starts, dtype=np.int64)
        self._where = where
        self._last: tuple | None = None  # ((file, row group), its text column)

    def __len__(self) -> int:
        return self.n_rows

    def _group(self, g: int):
        key = self._where[g]
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        fi, rg = key
        pf = self._pf[fi]
        if self.column not in pf.schema_arrow.names:  # as a dataset scan does: the missing column is null
            import pyarrow as pa

            col = pa.nulls(pf.metadata.row_group(rg).num_rows)
        else:
            col = pf.read_row_group(rg, columns=[self.column]).column(0)
        self._last = (key, col)
        return col

    def read(self, ids) -> list:
        """Values of rows ``ids`` (in range; any order), as Python objects."""
        ids = np.asarray(ids, dtype=np.int64)
        out: list = [None] * len(ids)
        if not len(ids):
            return out
        groups = np.searchsorted(self._starts, ids, side="right") - 1
        order = np.argsort(groups, kind="stable")
        for g in np.unique(groups):
            pos = order[groups[order] == g]
            local = ids[pos] - self._starts[g]
            vals = self._group(int(g)).take(local).to_pylist()
            for p, v in zip(pos.tolist(), vals):
                out[p] = v
        return out


def hf_rows(ds, column: str, ids) -> list:
    """Values of rows ``ids`` of a ``datasets.Dataset``'s column, gathered from its memory-mapped table."""
    ids = [int(i) for i in ids]
    if not ids:
        return []
    return list(ds.select_columns([column])[ids][column])
