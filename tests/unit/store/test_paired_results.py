"""``raysens.store.paired_results`` (issue 29): a paired layer written and read back — side a exactly
where and as an ordinary run writes it, side b beside it, the differences (npz + parquet) equal to
``PairedCells.differences`` and to numpy float64 references, the lossless state rebuilt bit for bit."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysens.stats.paired import PairedCells
from raysens.store import results
from raysens.store.paired_results import (B_FILE, DIFF_FILE, read_diff_stats, read_paired_state, read_side,
                                          write_paired_layer)


def _state(seed=0, n=17, s=5):
    rng = np.random.default_rng(seed)
    a = rng.lognormal(0, 1, (n, s, s))
    b = a * rng.lognormal(0, 0.1, (n, s, s))
    b[:, 1, 0] *= 2.5  # one cell really changes
    m = np.broadcast_to(np.tril(np.ones((s, s), bool)), a.shape).copy()
    return PairedCells.from_batch(a, b, m, a_noise=0.01 * a, sample_ids=np.arange(40, 40 + n)), a, b, m


def _same_state(x, y):
    xa, ya = x.to_arrays(), y.to_arrays()
    assert list(xa) == list(ya) and all(np.array_equal(xa[k], ya[k]) and xa[k].dtype == ya[k].dtype for k in xa)


def test_write_and_read_a_paired_layer(tmp_path):
    st, a, b, m = _state()
    run = str(tmp_path / "run")
    write_paired_layer(run, 7, st, fdr=0.1)
    for f in ("stats/layer_007.npz", "stats/layer_007.parquet", B_FILE.format(7), "stats/b/layer_007.parquet",
              DIFF_FILE.format(7), "stats/diff/layer_007.parquet"):
        assert (tmp_path / "run" / f).is_file(), f
    # side a: the ordinary stats file of model a, bit for bit what results.write_layer_stats writes
    plain = str(tmp_path / "plain")
    results.write_layer_stats(plain, 7, st.a)
    assert (tmp_path / "run/stats/layer_007.npz").read_bytes() == (tmp_path / "plain/stats/layer_007.npz").read_bytes()
    sa, sb = read_side(run, 7, "a"), read_side(run, 7, "b")
    _same_state(sa.state, st.a)
    _same_state(sb.state, st.b)
    np.testing.assert_allclose(sb.mean[m[0]], b.mean(0)[m[0]], rtol=1e-13)
    results.write_manifest(run, {"paired": {}})
    assert sorted(results.load_run(run).layers) == [7]  # stats/b and stats/diff are not layers of the run
    # the differences: the state's, and numpy's
    d = read_diff_stats(run, 7)
    ref = st.differences(0.1)
    assert d["fdr"] == 0.1 and d["count"] == 17 and set(ref) <= set(d)
    for k, v in ref.items():
        assert np.array_equal(np.asarray(d[k]), np.asarray(v), equal_nan=np.asarray(v).dtype.kind == "f"), k
    _same_state(d["state"], st.d)
    D = a - b
    np.testing.assert_allclose(d["mean_diff"][m[0]], D.mean(0)[m[0]], rtol=1e-12)
    np.testing.assert_allclose(d["se_diff"][m[0]], (D.std(0, ddof=1) / np.sqrt(17))[m[0]], rtol=1e-10)
    assert d["significant"][1, 0] and np.isnan(d["mean_diff"][0, 1])
    # the parquet long table: one row per cell, the same numbers
    t = pq.read_table(str(tmp_path / "run/stats/diff/layer_007.parquet")).to_pandas()
    assert len(t) == 25 and {"layer", "i", "j", "mean_diff", "se_diff", "p", "q", "significant",
                             "se_unpaired", "mean_log_ratio"} <= set(t.columns)
    row = t[(t.i == 1) & (t.j == 0)].iloc[0]
    assert row.layer == 7 and row.mean_diff == d["mean_diff"][1, 0] and bool(row.significant)
    # the whole state back, and the differences at another FDR from it
    back = read_paired_state(run, 7)
    _same_state(back, st)
    q = back.differences(0.01)["q"]
    assert np.array_equal(q, ref["q"], equal_nan=True)


def test_reading_what_is_not_there(tmp_path):
    st, *_ = _state(1)
    run = str(tmp_path / "run")
    write_paired_layer(run, 2, st)
    with pytest.raises(FileNotFoundError, match="read_diff_stats: .* has no stats/diff/layer_003.npz"):
        read_diff_stats(run, 3)
    with pytest.raises(ValueError, match="side must be 'a' or 'b'"):
        read_side(run, 2, "c")
    with pytest.raises(TypeError, match="must be a PairedCells"):
        write_paired_layer(run, 2, st.a)
