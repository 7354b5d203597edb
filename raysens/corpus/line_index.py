"""Random access into line-oriented corpora (JSONL, plain text) and a digest cache for corpus files.

A *line index* holds, for every record of a file (``text``: every line; ``jsonl``: every non-blank
line), the byte span of the record without its line ending: an ``[n, 2]`` uint64 array of
``(start, end)``. It is built once by one streaming pass (constant memory apart from the index,
16 bytes per record), which also computes the file's SHA-256, the records' SHA-256 (the lines
without endings, each followed by ``\\n``: the ``records_sha256`` of the corpus identity) and what
the caller's per-line check returns. Index and summary are cached on disk, keyed by the file's
URI, size and mtime (plus inode and ctime for local files, which every write changes), so a
second run, and every worker after the first on a node, only reads the summary and memory-maps
the index; a rewritten file has a new key, hence a new pass.

Cache directory: ``$RAYSENS_CORPUS_CACHE`` if set (``off`` disables the cache: every process
scans the file itself and keeps the index in memory), else ``$RAYSENS_CACHE/corpus`` (default
``~/.cache/raysens/corpus``, the same root as the model digests). An unwritable cache only costs a
rescan. numpy / pyarrow only.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow.fs as pafs

VERSION = 1


def cache_dir() -> Path | None:
    """Where line indexes and digests are cached; None when ``RAYSENS_CORPUS_CACHE=off``."""
    env = os.environ.get("RAYSENS_CORPUS_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none", "false") else Path(env).expanduser()
    return Path(os.environ.get("RAYSENS_CACHE", Path.home() / ".cache" / "raysens")) / "corpus"


def file_key(fs: pafs.FileSystem, path: str, what: str) -> str:
    """A key that changes whenever the file's bytes may have changed (``what``: what is cached)."""
    parts = [what, str(VERSION), type(fs).__name__, path]
    if isinstance(fs, pafs.LocalFileSystem):
        st = os.stat(path)
        parts += [str(st.st_size), str(st.st_mtime_ns), str(st.st_ctime_ns), str(st.st_ino), str(st.st_dev)]
    else:
        info = fs.get_file_info(path)
        parts += [str(info.size), str(info.mtime_ns)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]


def iter_lines(fs: pafs.FileSystem, path: str) -> Iterator[bytes]:
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


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(p: Path, write: Callable[[str], None]) -> None:
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(p) + f".tmp{os.getpid()}"
        write(tmp)
        os.replace(tmp, p)
    except OSError:  # a read-only cache only costs the work next time
        pass


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def cached_file_sha256(fs: pafs.FileSystem, path: str) -> str:
    """SHA-256 of a file's bytes, computed once per (path, size, mtime) and cached."""
    d = cache_dir()
    key = file_key(fs, path, "sha256")
    meta = _read_json(d / "digests" / f"{key}.json") if d is not None else None
    if meta and meta.get("sha256"):
        return meta["sha256"]
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if d is not None:
        _atomic_write(d / "digests" / f"{key}.json",
                      lambda t: Path(t).write_text(json.dumps({"path": path, "sha256": h.hexdigest()})))
    return h.hexdigest()


def scan(fs: pafs.FileSystem, path: str, check: Callable[[bytes, int], bool]) -> tuple[np.ndarray, dict]:
    """One streaming pass: ``check(line, line_number)`` (line without its ending; may raise) says
    whether the line is a record. Returns the records' spans and ``{rows, lines, records_sha256,
    file_sha256}``. Lines are what ``iter_lines`` yields: split at ``\\n``, trailing ``\\r``
    removed, a last line without ``\\n`` kept when not empty."""
    spans = array.array("Q")
    hrec, hfile = hashlib.sha256(), hashlib.sha256()
    ln, pos, carry = 0, 0, b""  # pos: file offset of carry's first byte
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            hfile.update(chunk)
            parts = (carry + chunk).split(b"\n")
            carry = parts.pop()
            for p in parts:
                line = p.rstrip(b"\r")
                ln += 1
                hrec.update(line + b"\n")
                if check(line, ln):
                    spans.append(pos), spans.append(pos + len(line))
                pos += len(p) + 1
        if carry:
            line = carry.rstrip(b"\r")
            ln += 1
            hrec.update(line + b"\n")
            if check(line, ln):
                spans.append(pos), spans.append(pos + len(line))
    arr = np.frombuffer(spans, dtype=np.uint64).reshape(-1, 2) if len(spans) else np.zeros((0, 2), np.uint64)
    return arr, {"rows": int(len(arr)), "lines": ln, "records_sha256": hrec.hexdigest(),
                 "file_sha256": hfile.hexdigest()}


def load_or_build(fs: pafs.FileSystem, path: str, kind: str, check: Callable[[bytes, int], bool],
                  summarize: Callable[[], dict]) -> tuple[np.ndarray, dict]:
    """The cached index and summary of ``path`` for records of ``kind``, else ``scan`` (with
    ``summarize()``'s fields, e.g. what ``check`` counted, added to the summary) and cache both.
    The index comes back memory-mapped when cached: only the pages of looked-up rows are read."""
    d = cache_dir()
    key = file_key(fs, path, "lines-" + kind)
    if d is not None:
        meta = _read_json(d / "line-index" / f"{key}.json")
        npy = d / "line-index" / f"{key}.npy"
        if meta is not None and meta.get("version") == VERSION:
            try:
                spans = np.load(npy, mmap_mode="r") if meta["rows"] else np.zeros((0, 2), np.uint64)
                if spans.shape == (meta["rows"], 2):
                    return spans, meta
            except (OSError, ValueError):
                pass
    spans, meta = scan(fs, path, check)
    meta.update(summarize(), version=VERSION, path=path, kind=kind)
    if d is not None:
        if len(spans):
            _atomic_write(d / "line-index" / f"{key}.npy", lambda t: _save_npy(t, spans))
        _atomic_write(d / "line-index" / f"{key}.json", lambda t: Path(t).write_text(json.dumps(meta)))
    return spans, meta


class LineReader:
    """Reads records by index through a line index: one positioned read per record."""

    def __init__(self, fs: pafs.FileSystem, path: str, spans: np.ndarray, key: str | None = None):
        self.fs, self.path, self.spans, self.key = fs, path, spans, key  # key: file_key when opened
        self._fd = None
        self._file = None

    def __len__(self) -> int:
        return len(self.spans)

    def read(self, ids) -> list[bytes]:
        """The records ``ids`` (in range; the caller checks) as bytes without line endings."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            pread = lambda n, off: os.pread(self._fd, n, off)  # noqa: E731
        else:
            if self._file is None:
                self._file = self.fs.open_input_file(self.path)
            pread = lambda n, off: self._file.read_at(n, off)  # noqa: E731
        out = []
        for i in ids:
            start, end = (int(x) for x in self.spans[int(i)])
            out.append(bytes(pread(end - start, start)) if end > start else b"")
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
