"""What drives a cell, end to end (docs/DESIGN.md §2.1-2.2, §6.5): a run on the bundled corpus with
one planted outlier sample (``RAYSENS_TEST_SCALE_SAMPLE``, raysens/testing/faults.py) and the
per-sample export: the stats name the sample, ``raysens report`` and ``raysens show`` name it and quote
its text, ``raysens show --sample`` plots it; extremes and quantiles equal numpy's over the exported
per-sample maps; a resume never duplicates an exported sample."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline_util import KEEP, assert_same_stats, config, PER_UNIT
from raysens.stats.histogram import EPS
from raysens.run.prepare import prepare
from raysens.run.runner import run_local
from raysens.store.per_sample import read_per_sample

PLANTED, FACTOR, N = 7, 300.0, 16


@pytest.fixture(scope="module")
def planted(tiny_model, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYSENS_TEST_SCALE_SAMPLE", f"{PLANTED}:{FACTOR}")
    try:
        out = tmp_path_factory.mktemp("planted") / "run"
        s = run_local(config(tiny_model, out, f"--data.limit={N}", "--cluster.batch_size=5", PER_UNIT,
                             "--output.per_sample=true", "--output.plots=true", KEEP))
    finally:
        mp.undo()
    return s


def _maps(run_dir, layer, s):
    """The exported per-sample maps of one layer as [n, s, s] with NaN where masked, and their ids."""
    t = read_per_sample(run_dir).to_pydict()
    ids, stack = [], []
    for sid, L, n, v in zip(t["sample_id"], t["layer"], t["length"], t["values"]):
        if L == layer:
            a = np.full((s, s), np.nan)
            a[:n, :n] = np.asarray(v, np.float64).reshape(n, n)
            ids.append(sid), stack.append(a)
    return np.array(ids), np.stack(stack)


def test_stats_name_the_planted_sample_and_match_numpy_on_the_exported_maps(planted, bundled_texts):
    run = planted.load()
    m = planted.manifest
    assert m["per_sample"] == {"dir": "per_sample", "files": 4, "missing_units": []}
    for L in run.layers:
        ls = run[L]
        s = ls.mean.shape[0]
        ids, x = _maps(planted.run_dir, L, s)
        assert sorted(ids) == list(range(N))  # every computed sample exactly once
        valid = ~np.isnan(x)
        np.testing.assert_array_equal(valid.sum(0), ls.cell_count)
        # the export is float32, the engine's values float64: equal to float32 rounding
        np.testing.assert_allclose(np.nanmean(x, 0), ls.mean, rtol=1e-6)
        reached = ls.cell_count > 0
        np.testing.assert_allclose(ls.max[reached], np.nanmax(x, 0)[reached], rtol=1e-6)
        filled = np.where(valid, x, -np.inf)
        who = np.where(filled == filled.max(0), ids[:, None, None], 10 ** 9).min(0)
        np.testing.assert_array_equal(ls.max_sample_id, np.where(reached, who, -1))
        for k, q in (("q25", .25), ("median", .5), ("q75", .75)):
            ref = np.nanquantile(x, q, axis=0)
            assert (np.abs(ls.__dict__[k] - ref)[reached] <= (EPS + 1e-6) * np.abs(ref[reached]) + 1e-300).all(), k
        # the planted sample dominates the rows it reaches; the median does not follow it
        n_tok = int(valid[list(ids).index(PLANTED)].diagonal().sum())
        assert (ls.row_max_sample_id[:n_tok] == PLANTED).all() and (ls.row_share[:n_tok] > 0.5).all()
        with np.errstate(invalid="ignore"):  # causal 0/0 cells
            assert np.nanmedian(ls.median[:n_tok, :n_tok] / ls.mean[:n_tok, :n_tok]) < 0.5


def test_report_and_show_name_the_planted_sample(planted, bundled_texts, tmp_path, capsys):
    from raysens import cli

    words = " ".join(bundled_texts[PLANTED].split()[:6])
    assert cli.main(["report", planted.run_dir, "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "What drives layer 1" in md and f"| {PLANTED} |" in md and words in md
    assert (tmp_path / "rep" / "layer_001_dominance.png").exists()
    capsys.readouterr()
    assert cli.main(["show", planted.run_dir, "--rows", "3"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if f" {PLANTED}  " in ln and "%*" in ln]
    assert len(lines) >= 2 and words.split()[0] in lines[0], out
    assert cli.main(["show", planted.run_dir, "--sample", str(PLANTED), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "per-sample export" in out and (tmp_path / "s" / f"sample_{PLANTED}_layer_002.png").exists()


def test_recomputed_sample_equals_the_exported_one(planted):
    from raysens.run.sample import sample_maps
    from raysens.store.per_sample import sample_map

    got = sample_maps(planted.run_dir, 3)  # not the planted one: the hook is off here
    for L, a in got.items():
        np.testing.assert_allclose(a, sample_map(planted.run_dir, 3, L), rtol=1e-5, atol=0)


def test_resume_keeps_one_row_per_sample_and_the_same_stats(planted, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSENS_TEST_SCALE_SAMPLE", f"{PLANTED}:{FACTOR}")
    d = tmp_path / "run"
    shutil.copytree(planted.run_dir, d)
    cfg = config(tiny_model, d, f"--data.limit={N}", "--cluster.batch_size=5", PER_UNIT, "--output.per_sample=true", KEEP)
    key = next(int(u[0]) for u in prepare(cfg).units if PLANTED in u)  # units are grouped by length (plan_units)
    (name,) = [n for n in os.listdir(d / "partials") if n.startswith(f"unit_{key:010d}-") and n.endswith(".npz")]
    os.remove(d / "partials" / name)  # the unit holding the planted sample is recomputed
    s = run_local(cfg)
    assert s.manifest["units"]["computed_this_run"] == 1
    assert_same_stats(s.load(), planted.load())  # bit for bit, the new arrays included
    t = read_per_sample(str(d))
    keys = list(zip(t.column("sample_id").to_pylist(), t.column("layer").to_pylist()))
    assert len(keys) == len(set(keys)) == 2 * N
    assert pq.read_schema(d / "per_sample" / f"unit_{key:010d}.parquet").field("values").type.value_type == "float"
