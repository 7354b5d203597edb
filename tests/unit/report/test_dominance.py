"""The "what drives a cell" views on a synthetic run directory: one sample (id 42) carries row 6,
another (id 17) a single cell; ``raysens report`` and ``raysens show`` name them and quote their
texts from the run's corpus; stats files round-trip the new arrays (npz + Parquet); runs written
before the extremes existed still load and report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("matplotlib")

from raysens.stats.cells import CellStats  # noqa: E402
from raysens.stats.welford import WelfordState  # noqa: E402
from raysens.report import dominance as dom  # noqa: E402
from raysens.report.commands import main_report, main_show  # noqa: E402
from raysens.store.results import load_run, write_layer_stats, write_manifest  # noqa: E402

S, B = 8, 12
IDS = np.arange(30, 30 + B)
IDS[5], IDS[9] = 42, 17
ROW, CELL = 6, (3, 1)


def _maps():
    rng = np.random.default_rng(0)
    i, j = np.indices((S, S))
    x = np.where((j <= i)[None], rng.uniform(0.5, 1.5, (B, S, S)), 0.0)
    x[5, ROW, :ROW + 1] *= 40.0  # sample 42 carries row 6
    x[9, CELL[0], CELL[1]] = 500.0  # sample 17 carries one cell
    return x


def _run(tmp_path, cells=True) -> str:
    corpus = tmp_path / "corpus.jsonl"
    texts = [f"filler text number {k} with several more words after it" for k in range(60)]
    texts[42] = "Sample forty two is the loud one in this toy corpus of words"
    texts[17] = "Seventeen carries exactly one cell and nothing else at all"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    path = str(tmp_path / "run")
    x = _maps()
    state = CellStats.from_batch(x, None, None, IDS) if cells else WelfordState.from_batch(x)
    write_layer_stats(path, 3, state)
    write_manifest(path, {"config": {"model": {"name": "toy"}, "data": {"source": str(corpus), "kind": "jsonl"},
                                     "layers": [3]},
                          "model": {"name": "toy"}, "estimator": "exact", "layers": [3], "seq_len": S,
                          "samples": {"total": B, "computed": B}})
    return path


def test_stats_files_round_trip_the_new_arrays(tmp_path):
    run = load_run(_run(tmp_path))
    ls = run[3]
    assert ls.row_max_sample_id[ROW] == 42 and ls.row_share[ROW] > 0.7
    assert ls.max_sample_id[CELL] == 17 and ls.max_share[CELL] > 0.9
    assert isinstance(ls.state, CellStats)
    np.testing.assert_array_equal(ls.max, ls.state.statistics()["max"])
    z = np.load(tmp_path / "run" / "stats" / "layer_003.npz")
    assert {"max", "max_sample_id", "q25", "median", "q75", "row_share", "quantile_bound", "state_hist_counts", "state_s1_limbs"} <= set(z.files)
    cols = pq.read_table(tmp_path / "run" / "stats" / "layer_003.parquet").column_names
    assert {"max", "max_sample_id", "max_share", "q25", "median", "q75"} <= set(cols)


def test_dominance_finds_the_row_and_the_cell(tmp_path):
    ls = load_run(_run(tmp_path))[3]
    rows = {r["i"]: r["sample_id"] for r in dom.dominated_rows(ls)}
    assert rows == {ROW: 42, CELL[0]: 17}  # the one huge cell carries its row too
    cells = dom.dominated_cells(ls)
    assert (CELL[0], CELL[1], 17) in [(c["i"], c["j"], c["sample_id"]) for c in cells]
    assert all(c["sample_id"] == 42 for c in cells if c["i"] == ROW)
    assert set(dom.culprits(ls)) == {42, 17}
    assert dom.dominated_rows(ls, share=0.99) == []


def test_report_and_show_name_the_samples_and_their_texts(tmp_path, capsys):
    path = _run(tmp_path)
    assert main_report([path, "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "What drives layer 3" in md
    assert "| 6 |" in md and "| 42 |" in md and "Sample forty two is the loud one" in md
    assert "| 17 |" in md and "Seventeen carries exactly one cell" in md
    assert (tmp_path / "rep" / "layer_003_dominance.png").exists()
    capsys.readouterr()
    assert main_show([path, "--rows", "2"]) == 0
    out = capsys.readouterr().out
    row = [ln for ln in out.splitlines() if "Sample forty two" in ln]
    assert row and row[0].split()[:3] == ["6", row[0].split()[1], "42"] and "*" in row[0]


def test_show_sample_without_export_needs_the_engine(tmp_path, capsys):
    path = _run(tmp_path)
    assert main_show([path, "--sample", "42"]) == 1
    assert "needs the engine" in capsys.readouterr().err
    fake = lambda run_dir, sid, layers: {L: np.eye(4) for L in layers}  # noqa: E731
    assert main_show([path, "--sample", "42", "--out", str(tmp_path / "p")], sample_map=fake) == 0
    assert (tmp_path / "p" / "sample_42_layer_003.png").exists()
    assert "Sample forty two" in capsys.readouterr().out


def test_runs_without_extremes_still_load_and_report(tmp_path, capsys):
    path = _run(tmp_path, cells=False)
    ls = load_run(path)[3]
    assert ls.max is None and ls.median is None and not dom.available(ls)
    assert main_report([path, "--out", str(tmp_path / "rep")]) == 0
    assert "What drives" not in (tmp_path / "rep" / "report.md").read_text()
    assert main_show([path]) == 0
