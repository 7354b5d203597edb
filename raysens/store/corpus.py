"""Corpus sources with stable sample ids.

A corpus is a sequence of texts; ``sample_id`` is a row's index in the source's own order (file
order, then line / row order), fixed before any shuffling or selection. Sources (``DataConfig.kind``):

- ``bundled``  the English corpus shipped in ``raysens/data/corpus.jsonl`` (see jobs/tools/make_corpus.py)
- ``jsonl``    JSON Lines, one object per non-blank line, text under ``text_column``
- ``text``     plain text, one sample per line (blank lines are samples too: empty, hence skipped)
- ``parquet``  a Parquet file or a directory of them (files in name order)
- ``hf_disk``  a Hugging Face ``datasets`` dataset written with ``save_to_disk``
- ``hf``       ``datasets.load_dataset(source, data_files=..., split=...)`` from local files

Paths may be local or any ``pyarrow.fs`` URI (``hf_*`` need local paths). The driver only asks a
source for its row count (streamed, constant memory); workers load the text column once per process
and look rows up by id.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.fs as pafs

from ..config import DataConfig
from .fs import resolve

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "corpus.jsonl"  # raysens/data/corpus.jsonl


class CorpusError(ValueError):
    """The corpus is missing, empty, unreadable or lacks the text column."""


def bundled_corpus_path() -> Path:
    return BUNDLED


def _kind(data: DataConfig) -> str:
    if data.kind != "auto":
        return data.kind
    src = data.source
    if src == "bundled":
        return "bundled"
    low = src.lower().rstrip("/")
    if low.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if low.endswith((".txt", ".text")):
        return "text"
    if low.endswith(".parquet"):
        return "parquet"
    if "://" not in src and Path(src).is_dir():
        p = Path(src)
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return "hf_disk"
        if any(p.glob("*.parquet")):
            return "parquet"
    if "://" not in src and not Path(src).exists():
        raise CorpusError(f"corpus {src!r} does not exist (data.source); give a file, a directory, "
                          "a pyarrow.fs URI, or 'bundled'")
    raise CorpusError(f"cannot tell the format of corpus {src!r}; set data.kind to one of "
                      "jsonl, text, parquet, hf_disk, hf")


def _iter_lines(fs: pafs.FileSystem, path: str) -> Iterator[bytes]:
    """Lines of a file without their line ending, streamed in 1 MiB chunks (constant memory)."""
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open_input_stream(path, compression=compression) as f:
        carry = b""
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            parts = (carry + chunk).split(b"\n")
            carry = parts.pop()
            for p in parts:
                yield p.rstrip(b"\r")
        if carry:
            yield carry.rstrip(b"\r")


class Corpus:
    """A corpus described by a ``DataConfig``; cheap to pickle, opened lazily where it is used."""

    def __init__(self, data: DataConfig):
        self.data = data
        self.kind = _kind(data)
        self.source = str(BUNDLED) if self.kind == "bundled" else data.source
        self.column = data.text_column
        self._texts = None  # worker side: the loaded text column

    def __getstate__(self):
        return {"data": self.data, "kind": self.kind, "source": self.source, "column": self.column, "_texts": None}

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "text_column": None if self.kind == "text" else self.column}

    # ------------------------------------------------------------------ driver side
    def num_rows(self) -> int:
        """Row count; checks the file exists, is readable and has the text column. Constant memory."""
        k = self.kind
        if k in ("hf_disk", "hf"):
            ds = self._hf()
            n = len(ds)
        elif k == "parquet":
            ds = self._parquet()
            if self.column not in ds.schema.names:
                raise CorpusError(f"corpus {self.source!r} has no column {self.column!r} (data.text_column); "
                                  f"columns: {ds.schema.names}")
            n = ds.count_rows()
        else:
            fs, path = self._file()
            n = 0
            for line in _iter_lines(fs, path):
                if k == "text":
                    n += 1
                elif line.strip():
                    if n == 0:
                        rec = self._json(line, 1)
                        if self.column not in rec:
                            raise CorpusError(
                                f"corpus {self.source!r} has no key {self.column!r} (data.text_column) in its "
                                f"first record; keys: {sorted(rec)}")
                    n += 1
        if n == 0:
            raise CorpusError(f"corpus {self.source!r} is empty (no rows)")
        return n

    def select(self, n_rows: int) -> np.ndarray:
        """Sorted int64 sample ids to run: the first ``limit`` rows, or ``limit`` rows picked at
        random with ``shuffle_seed`` when ``shuffle`` is set."""
        d = self.data
        ids = np.random.default_rng(d.shuffle_seed).permutation(n_rows) if d.shuffle else np.arange(n_rows)
        if d.limit is not None:
            ids = ids[: d.limit]
        return np.sort(ids).astype(np.int64)

    # ------------------------------------------------------------------ worker side
    def texts(self, ids) -> list:
        """Texts of rows ``ids`` (None where the row has no text). Loads the column once per process."""
        col = self._column()
        n = len(col)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise CorpusError(f"corpus {self.source!r}: sample_id {i} out of range (0..{n - 1})")
            out.append(col[i])
        return out

    def _column(self):
        key = (self.kind, self.source, self.column, self.data.split, json.dumps(self.data.data_files, default=str))
        cached = _COLUMNS.get(key)
        if cached is None:
            cached = _COLUMNS[key] = self._load_column()
        return cached

    def _load_column(self):
        k = self.kind
        if k in ("hf_disk", "hf"):
            ds = self._hf()
            return ds[self.column]  # a lazy column over the memory-mapped Arrow data
        if k == "parquet":
            return self._parquet().to_table(columns=[self.column]).column(self.column).to_pylist()
        fs, path = self._file()
        out = []
        for ln, line in enumerate(_iter_lines(fs, path), 1):
            if k == "text":
                out.append(line.decode("utf-8", errors="replace"))
            elif line.strip():
                out.append(self._json(line, ln).get(self.column))
        return out

    # ------------------------------------------------------------------ helpers
    def _file(self) -> tuple[pafs.FileSystem, str]:
        fs, path = resolve(self.source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise CorpusError(f"corpus file {self.source!r} does not exist (data.source)")
        if info.type != pafs.FileType.File:
            raise CorpusError(f"corpus {self.source!r} is not a file (data.kind={self.kind})")
        return fs, path

    def _json(self, line: bytes, ln: int) -> dict:
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise CorpusError(f"corpus {self.source!r}: line {ln} is not valid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise CorpusError(f"corpus {self.source!r}: line {ln} is not a JSON object")
        return rec

    def _parquet(self):
        import pyarrow.dataset as pads

        fs, path = resolve(self.source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise CorpusError(f"corpus {self.source!r} does not exist (data.source)")
        if info.type == pafs.FileType.Directory:
            files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                           if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
            if not files:
                raise CorpusError(f"corpus directory {self.source!r} holds no .parquet files")
        else:
            files = [path]
        try:
            return pads.dataset(files, filesystem=fs, format="parquet")
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise CorpusError(f"corpus {self.source!r} is not readable Parquet ({exc})") from None

    def _hf(self):
        import datasets

        src = self.source
        try:
            if self.kind == "hf_disk":
                if not Path(src).exists():
                    raise CorpusError(f"corpus {src!r} does not exist (data.source)")
                ds = datasets.load_from_disk(src)
            else:
                ds = datasets.load_dataset(src, data_files=self.data.data_files, split=self.data.split)
        except CorpusError:
            raise
        except Exception as exc:  # datasets raises FileNotFoundError, ValueError, DatasetGenerationError...
            raise CorpusError(f"cannot load Hugging Face dataset {src!r} ({type(exc).__name__}: {exc})") from None
        if isinstance(ds, (datasets.DatasetDict, dict)):
            split = self.data.split or ("train" if "train" in ds else None)
            if split not in ds:
                raise CorpusError(f"dataset {src!r} has splits {sorted(ds)}; choose one with data.split")
            ds = ds[split]
        if self.column not in ds.column_names:
            raise CorpusError(f"dataset {src!r} has no column {self.column!r} (data.text_column); "
                              f"columns: {ds.column_names}")
        return ds


_COLUMNS: dict = {}  # per-process cache of loaded text columns


def source_label(corpus: Corpus) -> str:
    return corpus.source if corpus.kind != "bundled" else "bundled:" + posixpath.basename(corpus.source)
