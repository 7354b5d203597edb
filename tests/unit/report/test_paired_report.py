"""``raysens show`` / ``raysens report`` / the run's plots on a paired run directory (issue 29), written by
the store's own writer from synthetic pairs with a known difference (``paired_util.make_paired_run``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from paired_util import LABELS, make_paired_run
from raysens.report import differences as dm
from raysens.report import paired as pr
from raysens.report.commands import main_compare, main_report, main_show
from raysens.report.render import _md_text
from raysens.store.results import load_run


@pytest.fixture(scope="module")
def paired_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("paired") / "run"
    truth = make_paired_run(path)
    return str(path), truth


def test_the_view_reads_both_sides_and_the_differences(paired_dir):
    path, truth = paired_dir
    run = load_run(path)
    v = pr.view(run)
    assert v is not None and v.layers == [1, 3] and v.labels == tuple(LABELS) and v.fdr == 0.05
    a, b, changed = truth[1]
    np.testing.assert_allclose(v.b(1).mean, b.mean(0), rtol=1e-12)
    np.testing.assert_allclose(run.layers[1].mean, a.mean(0), rtol=1e-12)
    d = v.diff(1)
    np.testing.assert_allclose(d["mean_diff"], (a - b).mean(0), rtol=1e-9, atol=1e-15)
    s = v.summary(1)
    sig = np.asarray(d["significant"], bool)
    assert (sig & changed).sum() == 37  # every shifted cell found …
    assert (sig & ~changed).sum() <= 3  # … and few false ones
    assert s.changed == int(sig.sum()) and s.tested == int(np.isfinite(d["p"]).sum())
    assert s.tested == 16 * 17 // 2  # the causal mask (j > i: D ≡ 0) is not tested
    low = np.tril(np.ones((16, 16), bool))
    n = a.shape[0]
    assert s.median_se_paired == pytest.approx(np.median(np.sqrt((a - b).var(0, ddof=1) / n)[low]), rel=1e-9)
    unpaired = np.sqrt(a.var(0, ddof=1) / n + b.var(0, ddof=1) / n)
    assert s.median_se_unpaired == pytest.approx(np.median(unpaired[low]), rel=1e-9)
    assert s.se_ratio < 0.1  # the sides share their per-sample factor
    assert pr.view(type(run)(run.path, {k: x for k, x in run.manifest.items() if k != "paired"}, run.layers)) is None


def test_show_prints_the_differences_dp_and_the_samples_a_claim_needs(paired_dir, capsys):
    path, _ = paired_dir
    assert main_show([path, "--target-se", "0.05"]) == 0
    out = capsys.readouterr().out
    v = pr.view(load_run(path))
    for L in (1, 3):
        assert v.summary(L).sentence(v.labels) in out
        assert v.summary(L).se_text() in out
    assert "paired run: toy − toy, layers.1.mlp × 1.01" in out
    assert "b          toy, scale {'module': 'layers.1.mlp', 'factor': 1.01}" in out
    dp = v.decay(3)["dp"][0]
    assert dp is not None and dp.method == dm.JOINT
    assert dp.lo < 0.3 < dp.hi and dp.excludes_zero()
    assert f"  {dp.text()} — excludes 0" in out
    assert f"p ({LABELS[0]}): " in out and f"p ({LABELS[1]}): " in out
    p = dm.difference_precision(v.diff(1), 0.05)
    assert f"over the {p['cells']:,} changed cells" in out
    assert f"{int(p['n_needed_median']):,} pairs" in out
    # without --target-se: no claim lines
    assert main_show([path]) == 0
    assert "samples a claim needs (relative SE of the mean difference" not in capsys.readouterr().out


def test_report_and_plots_of_a_paired_run(paired_dir, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = paired_dir
    out = tmp_path / "rep"
    assert main_report([path, "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    v = pr.view(load_run(path))
    assert f"Paired differences: {LABELS[0]} − {LABELS[1]}" in md
    for L in (1, 3):
        assert _md_text(v.summary(L).sentence(v.labels)) in md  # as Markdown shows it ("&gt;" for ">")
        assert (out / f"layer_{L:03d}_paired.png").stat().st_size > 10_000
    assert (out / "paired_summary.png").is_file()
    assert "Decay exponent per side and Δp" in md and "Samples a claim about the difference needs" in md
    from raysens.report.plots import write_run_plots

    written = {os.path.basename(p) for p in write_run_plots(path, str(tmp_path / "plots"))}
    assert {"layer_001_paired.png", "layer_003_paired.png", "paired_summary.png"} <= written


def test_compare_of_two_ordinary_runs_says_once_that_it_is_unpaired(paired_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, _ = paired_dir
    assert main_compare([path, path, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert out.count("unpaired") == 1 and "paired run" in out


def test_show_says_when_the_probes_were_not_common(paired_dir):
    path, _ = paired_dir
    run = load_run(path)
    assert not any(pr.NOT_COMMON in x for x in pr.format_paired(pr.view(run), [1]))
    run.manifest["paired"]["common_probes"] = False
    lines = pr.format_paired(pr.view(run), [1])
    assert f"  note       {pr.NOT_COMMON}" in lines
    assert not any("paired layer 3" in x for x in lines)  # --layer 1 only
