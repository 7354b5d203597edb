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

import hashlib
import json
import os
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


def _absolute(src: str, kind: str) -> str:
    """A local path made absolute (a relative path means the same file from any working directory,
    on the driver and on every worker); URIs and ``hf`` dataset names stay as given."""
    if "://" in src or (kind == "hf" and not Path(src).expanduser().exists()):
        return src
    return os.path.abspath(os.path.expanduser(src))


def _file_digest(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(fs: pafs.FileSystem, info: pafs.FileInfo, digest: str | None = None) -> dict:
    mtime = info.mtime.isoformat() if info.mtime is not None else None
    return {"path": info.path, "size": info.size, "mtime": mtime,
            "sha256": digest if digest is not None else _file_digest(fs, info.path)}


def _utf16_bom(line: bytes) -> bool:
    return line.startswith((b"\xff\xfe", b"\xfe\xff"))


class Corpus:
    """A corpus described by a ``DataConfig``; cheap to pickle, opened lazily where it is used.

    ``identity()`` (driver, while counting rows) is the content identity recorded in the manifest:
    the files' sizes, modification times and SHA-256 (``jsonl`` / ``text``: of the records as read,
    i.e. the lines without their endings, gzip decompressed; ``parquet`` / ``hf_disk``: of every
    file's bytes; ``hf``: the dataset's own fingerprint plus the local ``data_files``' SHA-256).
    Workers that load a ``jsonl`` / ``text`` corpus check they read the same records
    (``expected_sha256``), so a file changed during a run is an error, not a mix of two corpora.
    """

    def __init__(self, data: DataConfig):
        self.data = data
        self.kind = _kind(data)
        self.source = str(BUNDLED) if self.kind == "bundled" else _absolute(data.source, self.kind)
        self.column = data.text_column
        self._texts = None  # worker side: the loaded text column
        self._identity: dict | None = None  # driver side: set by num_rows()
        self.expected_sha256: str | None = None  # jsonl/text: the records' checksum workers must read
        self.content_key: str | None = None  # hash of identity(): a changed corpus is never served from _COLUMNS

    def __getstate__(self):
        return {"data": self.data, "kind": self.kind, "source": self.source, "column": self.column, "_texts": None,
                "_identity": None, "expected_sha256": self.expected_sha256, "content_key": self.content_key}

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "text_column": None if self.kind == "text" else self.column}

    def identity(self) -> dict:
        """Content identity (see the class doc); computed by ``num_rows()``."""
        if self._identity is None:
            self.num_rows()
        return self._identity

    # ------------------------------------------------------------------ driver side
    def num_rows(self) -> int:
        """Row count; checks the file exists, is readable and has the text column, and (``jsonl``)
        that every record is strict UTF-8 JSON. Computes ``identity()``. Constant memory."""
        k = self.kind
        ident: dict = {"kind": k, "source": self.source}
        if k in ("hf_disk", "hf"):
            ds = self._hf()
            n = len(ds)
            ident.update(self._hf_identity(ds))
        elif k == "parquet":
            ds = self._parquet()
            if self.column not in ds.schema.names:
                raise CorpusError(f"corpus {self.source!r} has no column {self.column!r} (data.text_column); "
                                  f"columns: {ds.schema.names}")
            n = ds.count_rows()
            fs, _ = resolve(self.source)
            ident["files"] = [_file_entry(fs, i) for i in fs.get_file_info(list(ds.files))]
        else:
            fs, path = self._file()
            n, undecodable, h = 0, 0, hashlib.sha256()
            for ln, line in enumerate(_iter_lines(fs, path), 1):
                h.update(line + b"\n")
                if ln == 1 and _utf16_bom(line):
                    raise CorpusError(f"corpus {self.source!r} is UTF-16 (byte-order mark); raysens reads "
                                      "UTF-8 only: convert it (e.g. iconv -f UTF-16 -t UTF-8)")
                if k == "text":
                    n += 1
                    undecodable += _decode_line(line) is None
                elif line.strip():
                    rec = self._json(line, ln)
                    if n == 0 and self.column not in rec:
                        raise CorpusError(
                            f"corpus {self.source!r} has no key {self.column!r} (data.text_column) in its "
                            f"first record; keys: {sorted(rec)}")
                    n += 1
            if n and undecodable == n:
                raise CorpusError(f"corpus {self.source!r} is not UTF-8 text: none of its {n} lines decodes "
                                  "as UTF-8 without NUL characters (a binary file?)")
            ident["files"] = [_file_entry(fs, fs.get_file_info(path), digest=None)]
            ident["records_sha256"] = h.hexdigest()
            self.expected_sha256 = ident["records_sha256"]
        if n == 0:
            raise CorpusError(f"corpus {self.source!r} is empty (no rows)")
        ident["rows"] = n
        self._identity = ident
        self.content_key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
        return n

    def _hf_identity(self, ds) -> dict:
        out: dict = {"dataset_fingerprint": getattr(ds, "_fingerprint", None)}
        fs = pafs.LocalFileSystem()
        if self.kind == "hf_disk":
            infos = fs.get_file_info(pafs.FileSelector(self.source, recursive=True))
            out["files"] = [_file_entry(fs, i) for i in sorted(infos, key=lambda i: i.path)
                            if i.type == pafs.FileType.File]
        else:
            df = self.data.data_files
            paths = [df] if isinstance(df, str) else (list(df) if isinstance(df, (list, tuple)) else
                                                     [p for v in (df or {}).values()
                                                      for p in ([v] if isinstance(v, str) else v)])
            local = [os.path.abspath(p) for p in paths if isinstance(p, str) and os.path.isfile(p)]
            out["files"] = [_file_entry(fs, fs.get_file_info(p)) for p in local]
        return out

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
        key = (self.kind, self.source, self.column, self.data.split, json.dumps(self.data.data_files, default=str),
               self.content_key)
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
        out, h = [], hashlib.sha256()
        for ln, line in enumerate(_iter_lines(fs, path), 1):
            h.update(line + b"\n")
            if k == "text":
                text = _decode_line(line)
                out.append(text if text is not None else UNDECODABLE)
            elif line.strip():
                out.append(self._json(line, ln).get(self.column))
        if self.expected_sha256 is not None and h.hexdigest() != self.expected_sha256:
            raise CorpusError(f"corpus {self.source!r} changed since the run was planned (SHA-256 of its records "
                              f"{h.hexdigest()[:16]}…, planned {self.expected_sha256[:16]}…); rerun the same "
                              "command: the run refuses to mix two versions of a corpus")
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
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"corpus {self.source!r}: line {ln} is not UTF-8 ({exc})") from None
        try:
            rec = json.loads(text)
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

UNDECODABLE = b"\x00not utf-8"  # a text line that is not UTF-8 (tokenize_unit skips it as not_utf8)


def _decode_line(line: bytes) -> str | None:
    """A text line as strict UTF-8 without NUL characters, or None."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def source_label(corpus: Corpus) -> str:
    return corpus.source if corpus.kind != "bundled" else "bundled:" + posixpath.basename(corpus.source)
