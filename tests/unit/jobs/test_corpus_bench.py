"""The corpus-read benchmark (``python -m jobs.bench.corpus``) on tiny corpora: the old and the new
reads give the same texts for the same selection, and every figure the notes quote is there."""

from __future__ import annotations

import pytest

from jobs.bench import corpus as bench


@pytest.mark.slow
def test_corpus_bench_runs_on_tiny_corpora(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CORPORA", {"jsonl1m": ("jsonl", 3000), "pq100k": ("parquet", 2500)})
    monkeypatch.setattr(bench, "ROW_GROUP", 1000)
    args = bench._parser().parse_args(["--dir", str(tmp_path), "--corpora", "jsonl1m", "pq100k", "--samples", "40",
                                       "--batch", "8"])
    res = bench.measure(args)
    assert res["same_texts_old_vs_new"]
    rows = res["results"]
    assert [(r["corpus"], r["impl"], r["cache"]) for r in rows] == [
        ("jsonl1m", "new", "cold"), ("jsonl1m", "new", "warm"), ("jsonl1m", "old", "-"),
        ("pq100k", "new", "cold"), ("pq100k", "new", "warm"), ("pq100k", "old", "-")]
    for r in rows:
        assert r["selected"] == 40 and r["units"] == 5 and r["tokenized"] == 40
        assert r["first_unit_s"] > 0 and r["driver_rss_mib"] > 0 and r["worker_rss_mib"] > 0
