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
source for its row count and content identity (constant memory); workers read only the rows they
are given, so what a process reads and holds grows with the selection, not with the corpus:
Parquet row groups of the selected rows (``row_readers.py``), ``datasets`` rows gathered from the
memory-mapped Arrow table, JSONL / text lines through a cached line-offset index
(``line_index.py``). Only gzip-compressed JSONL (no random access) is still read whole, once per
process.

Why this module is long: every corpus source behind one ``Corpus`` with stable sample ids
(selection, identity, description, text access); the row readers and line indexes are in their own
modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from ..config import DataConfig
from ..errors import RaysensError
from . import line_index
from ..store.fs import resolve
from .line_index import iter_lines as _iter_lines
from .row_readers import ParquetRows, hf_rows

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "corpus.jsonl"  # raysens/data/corpus.jsonl


class CorpusError(RaysensError, ValueError):
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


def _absolute(src: str, kind: str) -> str:
    """A local path made absolute (a relative path means the same file from any working directory,
    on the driver and on every worker); URIs and ``hf`` dataset names stay as given."""
    if "://" in src or (kind == "hf" and not Path(src).expanduser().exists()):
        return src
    return os.path.abspath(os.path.expanduser(src))


def _file_entry(fs: pafs.FileSystem, info: pafs.FileInfo, digest: str | None = None) -> dict:
    """A file's identity; its SHA-256 is cached by (path, size, mtime) (``line_index.cached_file_sha256``)."""
    mtime = info.mtime.isoformat() if info.mtime is not None else None
    return {"path": info.path, "size": info.size, "mtime": mtime,
            "sha256": digest if digest is not None else line_index.cached_file_sha256(fs, info.path)}


def _utf16_bom(line: bytes) -> bool:
    return line.startswith((b"\xff\xfe", b"\xfe\xff"))


class Corpus:
    """A corpus described by a ``DataConfig``; cheap to pickle, opened lazily where it is used.

    ``identity()`` (driver, while counting rows) is the content identity recorded in the manifest:
    the files' sizes, modification times and SHA-256 (``jsonl`` / ``text``: also of the records as
    read, i.e. the lines without their endings, gzip decompressed; ``parquet`` / ``hf_disk``: of
    every file's bytes; ``hf``: the dataset's own fingerprint plus the local ``data_files``' SHA-256).
    Digests and line indexes are cached by (path, size, mtime, …), see ``line_index.py``: a second
    run does not re-read the corpus. Workers reading a ``jsonl`` / ``text`` corpus check they read
    the same records (``expected_sha256``; the file is re-checked on every ``texts`` call), so a
    file changed during a run is an error, not a mix of two corpora.
    """

    def __init__(self, data: DataConfig):
        self.data = data
        self.kind = _kind(data)
        self.source = str(BUNDLED) if self.kind == "bundled" else _absolute(data.source, self.kind)
        self.column = data.text_column
        self._identity: dict | None = None  # driver side: set by num_rows()
        self.expected_sha256: str | None = None  # jsonl/text: the records' checksum workers must read
        self.content_key: str | None = None  # hash of identity(): a changed corpus is never served from _READERS

    def __getstate__(self):
        return {"data": self.data, "kind": self.kind, "source": self.source, "column": self.column,
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
            meta = self._stream(fs, path)[1] if self._gzip() else self._line_index(fs, path)[1]
            n = meta["rows"]
            if k == "jsonl" and n and self.column not in meta["first_keys"]:
                raise CorpusError(f"corpus {self.source!r} has no key {self.column!r} (data.text_column) in its "
                                  f"first record; keys: {meta['first_keys']}")
            if k == "text" and n and meta["undecodable"] == n:
                raise CorpusError(f"corpus {self.source!r} is not UTF-8 text: none of its {n} lines decodes "
                                  "as UTF-8 without NUL characters (a binary file?)")
            ident["files"] = [_file_entry(fs, fs.get_file_info(path), digest=meta.get("file_sha256"))]
            ident["records_sha256"] = meta["records_sha256"]
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
        random with ``shuffle_seed`` when ``shuffle`` is set (the first ``limit`` entries of
        ``default_rng(shuffle_seed).permutation(n_rows)``; shuffled as uint32 when the ids fit, the
        same draws at half the memory of the int64 permutation)."""
        d = self.data
        limit = n_rows if d.limit is None else min(int(d.limit), n_rows)
        if not d.shuffle or limit >= n_rows:
            return np.arange(limit, dtype=np.int64)
        perm = np.arange(n_rows, dtype=np.uint32 if n_rows < 2 ** 32 else np.int64)
        np.random.default_rng(d.shuffle_seed).shuffle(perm)
        return np.sort(perm[:limit]).astype(np.int64)

    # ------------------------------------------------------------------ worker side
    def texts(self, ids) -> list:
        """Texts of rows ``ids`` (None where the row has no text). Reads only those rows (see the module doc)."""
        ids = [int(i) for i in ids]
        reader = self._reader()
        n = len(reader)
        for i in ids:
            if not 0 <= i < n:
                raise CorpusError(f"corpus {self.source!r}: sample_id {i} out of range (0..{n - 1})")
        k = self.kind
        if k in ("hf_disk", "hf"):
            return hf_rows(reader, self.column, ids)
        if isinstance(reader, (ParquetRows, list)):  # list: a gzip JSONL column loaded whole
            return reader.read(ids) if isinstance(reader, ParquetRows) else [reader[i] for i in ids]
        return [self._value(line, f"record {i}") for i, line in zip(ids, reader.read(ids))]

    def _value(self, line: bytes, where: str):
        """A record's text: ``text`` lines decoded (``UNDECODABLE`` if not UTF-8), JSONL the text column."""
        if self.kind == "text":
            t = _decode_line(line)
            return t if t is not None else UNDECODABLE
        return self._json(line, where).get(self.column)

    def _reader(self):
        """This process's reader of the corpus (opened once; a line index is re-checked on every call)."""
        key = (self.kind, self.source, self.column, self.data.split, json.dumps(self.data.data_files, default=str),
               self.content_key)
        cached = _READERS.get(key)
        if isinstance(cached, line_index.LineReader):
            try:
                changed = cached.key != line_index.file_key(cached.fs, cached.path, "lines-" + self.kind)
            except OSError as exc:
                raise CorpusError(f"corpus {self.source!r} is no longer readable ({exc})") from None
            if changed:
                cached.close()
                cached = None
        if cached is None:
            cached = _READERS[key] = self._open_reader()
        return cached

    def _open_reader(self):
        k = self.kind
        if k in ("hf_disk", "hf"):
            return self._hf()
        if k == "parquet":
            ds = self._parquet()
            fs, _ = resolve(self.source)
            return ParquetRows(fs, list(ds.files), self.column)
        fs, path = self._file()
        if self._gzip():
            texts, meta = self._stream(fs, path, keep=True)
            self._check_records(meta["records_sha256"])
            return texts
        spans, meta = self._line_index(fs, path)
        self._check_records(meta["records_sha256"])
        return line_index.LineReader(fs, path, spans, meta["key"])

    def _check_records(self, got: str) -> None:
        if self.expected_sha256 is not None and got != self.expected_sha256:
            raise CorpusError(f"corpus {self.source!r} changed since the run was planned (SHA-256 of its records "
                              f"{got[:16]}…, planned {self.expected_sha256[:16]}…); rerun the same "
                              "command: the run refuses to mix two versions of a corpus")

    def _checker(self):
        """The per-line check of a JSONL / text corpus (UTF-16 refused, every JSONL record strict
        UTF-8 JSON; True: the line is a record) and what it records (first keys, undecodable lines)."""
        k, seen = self.kind, {"first_keys": None, "undecodable": 0}

        def check(line: bytes, ln: int) -> bool:
            if ln == 1 and _utf16_bom(line):
                raise CorpusError(f"corpus {self.source!r} is UTF-16 (byte-order mark); raysens reads "
                                  "UTF-8 only: convert it (e.g. iconv -f UTF-16 -t UTF-8)")
            if k == "text":
                seen["undecodable"] += _decode_line(line) is None
                return True
            if not line.strip():
                return False
            rec = self._json(line, f"line {ln}")
            if seen["first_keys"] is None:
                seen["first_keys"] = sorted(rec)
            return True

        return check, seen

    def _line_index(self, fs: pafs.FileSystem, path: str) -> tuple[np.ndarray, dict]:
        """Spans of the records of a JSONL / text file and its summary (cached; see ``line_index.py``)."""
        check, seen = self._checker()
        key = line_index.file_key(fs, path, "lines-" + self.kind)
        spans, meta = line_index.load_or_build(fs, path, self.kind, check, lambda: {**seen, "key": key})
        return spans, {**meta, "key": key}

    def _gzip(self) -> bool:
        return self.kind in ("jsonl", "text", "bundled") and self.source.endswith(".gz")

    def _stream(self, fs: pafs.FileSystem, path: str, keep: bool = False) -> tuple[list, dict]:
        """gzip (no random access): one streaming pass with the line index's checks; ``keep``: the texts too."""
        check, seen = self._checker()
        out, h, n = [], hashlib.sha256(), 0
        for ln, line in enumerate(_iter_lines(fs, path), 1):
            h.update(line + b"\n")
            if check(line, ln):
                n += 1
                if keep:
                    out.append(self._value(line, f"line {ln}"))
        return out, {**seen, "rows": n, "records_sha256": h.hexdigest()}

    # ------------------------------------------------------------------ helpers
    def _file(self) -> tuple[pafs.FileSystem, str]:
        fs, path = resolve(self.source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise CorpusError(f"corpus file {self.source!r} does not exist (data.source)")
        if info.type != pafs.FileType.File:
            raise CorpusError(f"corpus {self.source!r} is not a file (data.kind={self.kind})")
        return fs, path

    def _json(self, line: bytes, where: str) -> dict:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"corpus {self.source!r}: {where} is not UTF-8 ({exc})") from None
        try:
            rec = json.loads(text)
        except ValueError as exc:
            raise CorpusError(f"corpus {self.source!r}: {where} is not valid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise CorpusError(f"corpus {self.source!r}: {where} is not a JSON object")
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


_READERS: dict = {}  # per-process cache of opened corpus readers (Corpus._reader)

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
