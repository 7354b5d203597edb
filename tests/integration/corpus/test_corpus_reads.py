"""Corpus reads proportional to the selection (issue 10): the same sample ids and texts as the
whole-column reads they replace, on tricky files, and the caches that keep a changed corpus detected.

``_reference_*`` below are the implementations before the change (whole file / whole column per
process), kept privately as the oracle."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raysens.config import DataConfig
from raysens.corpus import reader as corpus_mod
from raysens.corpus import line_index
from raysens.corpus.reader import UNDECODABLE, Corpus, CorpusError, _decode_line


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSENS_CORPUS_CACHE", str(tmp_path / "cache"))
    corpus_mod._READERS.clear()
    yield
    corpus_mod._READERS.clear()


# ---------------------------------------------------------------------- the old implementation
def _reference_lines(path: str):
    with open(path, "rb") as f:
        carry = b""
        while chunk := f.read(1 << 20):
            parts = (carry + chunk).split(b"\n")
            carry = parts.pop()
            for p in parts:
                yield p.rstrip(b"\r")
        if carry:
            yield carry.rstrip(b"\r")


def _reference_text_column(path: str, kind: str, column: str = "text"):
    out, h = [], hashlib.sha256()
    for line in _reference_lines(path):
        h.update(line + b"\n")
        if kind == "text":
            t = _decode_line(line)
            out.append(t if t is not None else UNDECODABLE)
        elif line.strip():
            out.append(json.loads(line.decode("utf-8")).get(column))
    return out, h.hexdigest()


def _reference_select(n_rows: int, limit, shuffle: bool, seed: int) -> list[int]:
    ids = np.random.default_rng(seed).permutation(n_rows) if shuffle else np.arange(n_rows)
    if limit is not None:
        ids = ids[:limit]
    return np.sort(ids).astype(np.int64).tolist()


# ---------------------------------------------------------------------- tricky files
TRICKY_TEXT = (b"\xef\xbb\xbffirst line after a UTF-8 BOM\r\n"
               b"\n"                        # empty line: a sample (skipped as empty later)
               b"crlf line\r\n"
               b"two carriage returns\r\r\n"
               b"bad utf-8 \xff\xfe here\n"
               b"nul \x00 inside\n"
               b"   \n"
               b"\t\x0b\x0c\n"
               b"caf\xc3\xa9 \xe2\x80\x94 unicode\n"
               b"a lone \r inside\n"
               b"last line without newline\r")


def _tricky_jsonl() -> bytes:
    recs = [json.dumps({"text": "plain"}), "", "   ", json.dumps({"text": "caf\u00e9", "x": 1}, ensure_ascii=False),
            "\t\x0b\x0c", json.dumps({"other": "no text key"}), json.dumps({"text": None}), json.dumps({"text": 5}),
            json.dumps({"text": "\r inner cr \n escaped nl"}), "\r", json.dumps({"text": ""})]
    return ("\r\n".join(recs[:4]) + "\n" + "\n".join(recs[4:]) + "\n\n" + json.dumps({"text": "end"})).encode()


def _big_lines(seed: int, n: int) -> bytes:
    """~3 MB over several 1 MiB read chunks: CRLF / CR / LF pairs straddle chunk boundaries."""
    rng = random.Random(seed)
    parts = []
    for i in range(n):
        body = "x" * rng.choice([0, 1, 5, 80, 700, 5000]) + f" {i}"
        parts.append(json.dumps({"text": body}).encode() + rng.choice([b"\n", b"\r\n", b"\r\r\n", b"\n\n"]))
    return b"".join(parts)


@pytest.mark.parametrize("kind,content", [
    ("text", TRICKY_TEXT), ("jsonl", _tricky_jsonl()), ("jsonl", _big_lines(0, 3000)),
    ("text", _big_lines(1, 3000)), ("text", b"only line"), ("text", b"\n\n\n"), ("jsonl", b'{"text": "a"}\n'),
])
def test_line_reads_equal_the_whole_file_reads(tmp_path, kind, content):
    path = tmp_path / ("c.txt" if kind == "text" else "c.jsonl")
    path.write_bytes(content)
    want, want_sha = _reference_text_column(str(path), kind)
    for attempt in range(2):  # built, then from the cache
        c = Corpus(DataConfig(source=str(path), kind=kind))
        n = c.num_rows()
        assert n == len(want) and c.identity()["records_sha256"] == want_sha
        assert c.identity()["files"][0]["sha256"] == hashlib.sha256(content).hexdigest()
        assert c.texts(range(n)) == want
        ids = random.Random(attempt).sample(range(n), min(n, 7))
        assert c.texts(ids) == [want[i] for i in ids]  # any order, one positioned read each
        corpus_mod._READERS.clear()
    # a remote-style filesystem (no os.pread): the same records through open_input_file
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    spans, _ = line_index.load_or_build(fs, path.name, kind, lambda line, ln: kind == "text" or bool(line.strip()),
                                        dict)
    raw = line_index.LineReader(fs, path.name, spans).read(range(len(want)))
    assert [_decode_line(r) if kind == "text" else json.loads(r).get("text") for r in raw] == \
        [w if w is not UNDECODABLE else None for w in want]


def test_identity_and_errors_match_before_and_after_the_cache(tmp_path):
    (tmp_path / "u16.txt").write_bytes("hello\n".encode("utf-16"))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\xff\n\x80\x81\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": broken\n')
    (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
    for name, match in [("u16.txt", "UTF-16"), ("bin.txt", "not UTF-8 text"), ("bad.jsonl", "line 3 is not valid JSON"),
                        ("nokey.jsonl", "no key 'text'")]:
        for _ in range(2):  # a refused file is refused again (nothing cached that hides it)
            with pytest.raises(CorpusError, match=match):
                Corpus(DataConfig(source=str(tmp_path / name))).num_rows()
    # the column check uses the cached first record's keys: another column is fine on the same file
    assert Corpus(DataConfig(source=str(tmp_path / "nokey.jsonl"), text_column="body")).num_rows() == 1


def test_second_run_reads_no_file_and_a_changed_file_is_detected(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50)))
    first = Corpus(DataConfig(source=str(path)))
    first.num_rows()
    scans = []
    real_scan = line_index.scan
    monkeypatch.setattr(line_index, "scan", lambda *a: scans.append(1) or real_scan(*a))
    again = Corpus(DataConfig(source=str(path)))
    again.num_rows()
    assert again.identity() == first.identity() and not scans  # summary and digests from the cache
    assert again.texts([3, 49]) == ["row 3", "row 49"] and not scans
    # rewritten between planning and the workers' reads (same size): the worker refuses it
    path.write_text("".join(json.dumps({"text": f"row {i}"[::-1]}) + "\n" for i in range(50)))
    with pytest.raises(CorpusError, match="changed since the run was planned"):
        again.texts([0])
    corpus_mod._READERS.clear()
    fresh = Corpus(DataConfig(source=str(path)))
    fresh.num_rows()
    assert fresh.identity()["records_sha256"] != first.identity()["records_sha256"]
    assert fresh.identity()["files"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_without_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSENS_CORPUS_CACHE", "off")
    path = tmp_path / "c.txt"
    path.write_bytes(TRICKY_TEXT)
    c = Corpus(DataConfig(source=str(path)))
    want, sha = _reference_text_column(str(path), "text")
    assert c.num_rows() == len(want) and c.texts(range(len(want))) == want
    assert c.identity()["records_sha256"] == sha and not (tmp_path / "cache").exists()


def test_gzip_jsonl_still_reads(tmp_path):
    import gzip

    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(_tricky_jsonl())
    c = Corpus(DataConfig(source=str(path)))
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(_tricky_jsonl())
    want, sha = _reference_text_column(str(raw), "jsonl")
    assert c.num_rows() == len(want) and c.identity()["records_sha256"] == sha
    assert c.texts([0, 3, len(want) - 1]) == [want[0], want[3], want[-1]]


def test_parquet_row_groups_equal_the_whole_column(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    d = tmp_path / "pq"
    d.mkdir()
    texts = [f"text {i} " + "y" * int(rng.integers(0, 40)) if i % 17 else (None if i % 2 else "") for i in range(5000)]
    bounds = [0, 1, 1200, 1200, 3100, 5000]  # an empty file, a one-row file, row groups of 97 rows
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        pq.write_table(pa.table({"id": np.arange(a, b), "text": pa.array(texts[a:b], pa.string())}),
                       d / f"part-{k:02d}.parquet", row_group_size=97)
    pq.write_table(pa.table({"id": np.arange(3)}), d / "part-99.parquet")  # no text column: null rows, as before
    texts += [None] * 3
    c = Corpus(DataConfig(source=str(d)))
    assert c.num_rows() == 5003
    old = c._parquet().to_table(columns=["text"]).column("text").to_pylist()  # the whole-column read it replaces
    assert old == texts and c.texts(range(5003)) == texts
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or real(self, i, **kw))
    corpus_mod._READERS.clear()
    ids = sorted(rng.choice(5003, 40, replace=False).tolist())
    assert c.texts(ids) == [texts[i] for i in ids] and c.texts(ids[::-1]) == [texts[i] for i in ids[::-1]]
    assert len(read) <= 2 * 40 and len(set(read)) < 5000 // 97  # only row groups holding selected rows
    with pytest.raises(CorpusError, match="out of range"):
        c.texts([5003])


def test_hf_rows_equal_the_whole_column(tmp_path):
    import datasets

    texts = [f"sample {i}" if i % 5 else "" for i in range(300)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(300))}).save_to_disk(str(tmp_path / "hf"))
    c = Corpus(DataConfig(source=str(tmp_path / "hf")))
    assert c.num_rows() == 300
    ids = [299, 0, 17, 5, 128]
    assert c.texts(ids) == [texts[i] for i in ids] and c.texts(range(300)) == texts
    assert c.texts([]) == []


@pytest.mark.parametrize("n_rows,limit,shuffle,seed", [
    (100, 10, True, 3), (100, None, True, 3), (100, 1000, True, 0), (5, 3, False, 0), (1, 1, True, 9),
    (100_003, 200, True, 1), (100_003, 10_000, True, 42), (70_000, 69_999, True, 5), (10, None, False, 0),
])
def test_selection_equals_the_int64_permutation(n_rows, limit, shuffle, seed):
    c = Corpus(DataConfig(limit=limit, shuffle=shuffle, shuffle_seed=seed))
    got = c.select(n_rows)
    assert got.dtype == np.int64 and got.tolist() == _reference_select(n_rows, limit, shuffle, seed)


def test_cache_key_changes_with_the_file(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("abc\n")
    fs = pafs.LocalFileSystem()
    k1 = line_index.file_key(fs, str(p), "x")
    assert line_index.file_key(fs, str(p), "x") == k1 and line_index.file_key(fs, str(p), "y") != k1
    st = os.stat(p)
    p.write_text("abd\n")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, mtime put back: ctime still moves
    assert line_index.file_key(fs, str(p), "x") != k1
