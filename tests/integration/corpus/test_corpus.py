"""Corpus sources: stable sample ids across formats, selection, and clear errors for bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysens.config import DataConfig
from raysens.corpus.reader import Corpus, CorpusError

TEXTS = ["The first sample is here.", "", "Second real sentence of text.", "  ", "A third one, longer than the rest."]


def _all(c: Corpus):
    n = c.num_rows()
    return c.texts(range(n))


def test_bundled_corpus_is_real_english_and_big_enough(bundled_texts):
    assert len(bundled_texts) >= 1000
    assert len(set(bundled_texts)) == len(bundled_texts)
    words = " ".join(bundled_texts).split()
    common = sum(w.lower() in {"the", "a", "is", "of", "to", "and", "in", "that"} for w in words)
    assert common / len(words) > 0.1  # English function words, not code
    assert np.median([len(t) for t in bundled_texts]) > 200  # a few sentences each
    c = Corpus(DataConfig())
    assert c.kind == "bundled" and c.num_rows() == len(bundled_texts)


def test_formats_give_the_same_ids(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(TEXTS) + "\n")
    with open(tmp_path / "c.jsonl", "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"body": t, "other": 1}) + "\n\n")  # blank lines are not records
    pq.write_table(pa.table({"body": TEXTS[:2]}), tmp_path / "a.parquet")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"body": TEXTS[:2]}), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(pa.table({"body": TEXTS[2:]}), tmp_path / "pq" / "part-1.parquet")
    import datasets

    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS})}).save_to_disk(str(tmp_path / "hfd"))
    (tmp_path / "c.csv").write_text("body\n" + "\n".join(f'"{t}"' for t in TEXTS) + "\n")
    cases = [
        DataConfig(source=str(tmp_path / "c.txt")),
        DataConfig(source=str(tmp_path / "c.jsonl"), text_column="body"),
        DataConfig(source=f"file://{tmp_path}/c.jsonl", text_column="body", kind="jsonl"),
        DataConfig(source=str(tmp_path / "pq"), text_column="body"),
        DataConfig(source=str(tmp_path / "hf"), text_column="body"),
        DataConfig(source=str(tmp_path / "hfd"), text_column="body"),
        DataConfig(source="csv", kind="hf", data_files=str(tmp_path / "c.csv"), text_column="body"),
    ]
    for d in cases:
        got = _all(Corpus(d))
        got = [t if t is not None else "" for t in got]  # csv reads "" as null
        assert [t.strip() for t in got] == [t.strip() for t in TEXTS], d
    # a Parquet file + text column lookups by id
    c = Corpus(DataConfig(source=str(tmp_path / "a.parquet"), text_column="body"))
    assert c.num_rows() == 2 and c.texts([1, 0]) == [TEXTS[1], TEXTS[0]]


def test_selection_limit_and_shuffle():
    c = Corpus(DataConfig(limit=10))
    assert c.select(100).tolist() == list(range(10))
    s = Corpus(DataConfig(limit=10, shuffle=True, shuffle_seed=3)).select(100)
    assert len(s) == 10 and list(s) == sorted(s) and s.tolist() != list(range(10))
    assert s.tolist() == Corpus(DataConfig(limit=10, shuffle=True, shuffle_seed=3)).select(100).tolist()
    assert s.tolist() != Corpus(DataConfig(limit=10, shuffle=True, shuffle_seed=4)).select(100).tolist()
    assert Corpus(DataConfig(limit=1000)).select(5).tolist() == [0, 1, 2, 3, 4]


def test_missing_file(tmp_path):
    for src in (tmp_path / "nope.jsonl", tmp_path / "nope.txt", tmp_path / "nope.parquet"):
        with pytest.raises(CorpusError, match="does not exist"):
            Corpus(DataConfig(source=str(src))).num_rows()
    with pytest.raises(CorpusError, match="does not exist"):
        Corpus(DataConfig(source=str(tmp_path / "nothing-here"))).num_rows()


def test_empty_corpus(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "e.txt").write_text("")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    for name in ("e.jsonl", "e.txt", "e.parquet"):
        with pytest.raises(CorpusError, match="empty"):
            Corpus(DataConfig(source=str(tmp_path / name))).num_rows()


def test_missing_text_column(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "c.parquet")
    import datasets

    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(str(tmp_path / "hf"))
    for name in ("c.jsonl", "c.parquet", "hf"):
        with pytest.raises(CorpusError, match=re.escape("no") + ".*'text'.*content"):
            Corpus(DataConfig(source=str(tmp_path / name))).num_rows()


def test_bad_json_line_is_named(tmp_path):
    """Every record is checked when the rows are counted (before a run writes anything)."""
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    c = Corpus(DataConfig(source=str(tmp_path / "c.jsonl")))
    with pytest.raises(CorpusError, match="line 2 is not valid JSON"):
        c.num_rows()


def test_out_of_range_id(tmp_path):
    (tmp_path / "c.txt").write_text("a b c\n")
    with pytest.raises(CorpusError, match="out of range"):
        Corpus(DataConfig(source=str(tmp_path / "c.txt"))).texts([3])
