"""``raysens report`` / ``show`` / ``compare`` on synthetic run directories with planted cells."""

from __future__ import annotations

import base64
import os
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from raysens.report.commands import differences, main_compare, main_report, main_show  # noqa: E402
from raysens.store.results import load_run, write_layer_stats, write_manifest  # noqa: E402
from raysens.stats.welford import WelfordState  # noqa: E402

S, B = 10, 20
PLANT = (7, 3, 50.0)  # (i, j, value): far above every other cell (others are O(1))
DELTA = (5, 2, 10.0)  # added to run B at (i, j) in every sample


def maps(layer: int, seed: int = 0, delta: tuple | None = None) -> np.ndarray:
    rng = np.random.default_rng(100 * seed + layer)
    i, j = np.indices((S, S))
    x = (np.exp(-(i - j) / 3.0) + (i == j))[None] * rng.uniform(0.5, 1.5, (B, S, S))
    x[:, PLANT[0], PLANT[1]] = PLANT[2] + rng.normal(0, 1.0, B)
    if delta:
        x[:, delta[0], delta[1]] += delta[2]
    return np.where((j <= i)[None], x, 0.0)


def make_run(path, layers=(2,), seed=0, delta=None, name="toy", estimator="hutchinson", num_probes=4) -> str:
    path = str(path)
    for L in layers:
        x = maps(L, seed, delta)
        # K=1 measures no probe noise (the state gets none, as the engine gives none)
        write_layer_stats(path, L, WelfordState.empty(S).update(x, noise=0.02 * x if num_probes > 1 else None))
    write_manifest(path, {
        "config": {"model": {"name": name, "trust_remote_code": False},
                   "data": {"source": "bundled", "limit": B + 2, "max_seq_len": S},
                   "sensitivity": {"estimator": estimator, "num_probes": num_probes,
                                   "probe_distribution": "rademacher"},
                   "layers": list(layers), "output": {"dir": path}},
        "versions": {"raysens": "0.1.0", "ray": "2.60.0"},
        "model": {"name": name, "class": "LlamaModel", "model_type": "llama", "num_hidden_layers": 4,
                  "hidden_size": 32, "parameters": 12345},
        "estimator": estimator, "num_probes": num_probes, "seed": 0, "layers": list(layers), "max_seq_len": S, "seq_len": S,
        "samples": {"total": B + 2, "computed": B, "skipped": 2, "skipped_by_reason": {"too_short": 2},
                    "skipped_ids": {"too_short": [4, 11]}},
        "timings": {"wall_s": 7.25, "samples_per_s": B / 7.25},
    })
    return path


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("rep") / "run_a")


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("rep") / "run_b", delta=DELTA)


@pytest.fixture(scope="module")
def report(run_a):
    assert main_report([run_a]) == 0
    return os.path.join(run_a, "report")


def test_report_html_is_self_contained(report):
    html = open(os.path.join(report, "report.html"), encoding="utf-8").read()
    for section in ("Overview", "Sample counts and standard errors", "Across layers", "Layer 2",
                    "Top 10 cells, layer 2", "Timings", "Run configuration", "Versions"):
        assert f">{section}</h" in html, f"section {section!r} missing"
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) == 5  # heatmap, distance, sink, layers summary, decay (a causal run)
    assert all(base64.b64decode(d)[:8] == b"\x89PNG\r\n\x1a\n" for d in imgs)
    assert "src='layer_" not in html and "<script" not in html  # nothing fetched from outside
    # the configuration table and the estimator with its standard error
    assert "sensitivity.estimator" in html and "hutchinson (K = 4 probes, rademacher)" in html
    assert "SE of mean" in html and "probe part" in html
    assert "wall_s" in html and "7.25 s" in html


def test_report_markdown_and_pngs(report):
    md = open(os.path.join(report, "report.md"), encoding="utf-8").read()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert sorted(refs) == sorted(["layer_002_heatmap.png", "layer_002_distance.png", "layer_002_sink.png",
                                   "layers_summary.png", "decay.png"])
    for r in refs:
        assert os.path.getsize(os.path.join(report, r)) > 8_000
    assert "| 1 | 7 | 3 |" in md  # the planted cell tops the table
    assert "## Run configuration" in md and "| model.name | toy |" in md


def test_report_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep / "s10_toy", name="toy")
    make_run(sweep / "nested" / "s10_other", seed=1, name="other", estimator="exact")
    out = tmp_path / "out"
    assert main_report([str(sweep), "--out", str(out)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert ">Sweep overview</h2>" in html and ">Per-layer summaries across the sweep</h2>" in html
    assert ">Run s10_toy</h2>" in html and ">Run nested/s10_other</h2>" in html
    assert html.count("data:image/png;base64,") == 1 + 2 * 5
    assert (out / "sweep_summary.png").stat().st_size > 8_000
    assert (out / "nested_s10_other" / "layer_002_heatmap.png").exists()
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| s10_toy | toy | 2 | 10 | bundled | hutchinson | 20 |" in md
    assert "| nested/s10_other | other | 2 | 10 | bundled | exact | 20 |" in md


def test_show_lists_planted_top_cell(run_a, capsys):
    assert main_show([run_a, "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+\s+[\d.e+-]+\s", ln)]
    assert rows[0][:3] == ["1", "7", "3"] and float(rows[0][3]) == pytest.approx(PLANT[2], abs=1.0)
    assert len(rows) == 3
    assert "hutchinson (K=4 probes, rademacher)" in out
    assert "skipped 2" in out and "too_short" in out and "4, 11" in out
    assert "wall_s 7.25" in out and "computed 20" in out


def test_compare_with_itself_is_zero(run_a, tmp_path, capsys):
    assert main_compare([run_a, run_a, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "max |B − A| = 0" in out
    d = differences(load_run(run_a), load_run(run_a))
    assert np.nanmax(np.abs(d[2])) == 0
    assert (tmp_path / "c" / "compare_layer_002.png").stat().st_size > 8_000


def test_compare_finds_planted_difference(run_a, run_b, tmp_path, capsys):
    assert main_compare([run_a, run_b, "--out", str(tmp_path / "c"), "--top", "1"]) == 0
    out = capsys.readouterr().out
    d = differences(load_run(run_a), load_run(run_b))[2]
    i, j = np.unravel_index(np.nanargmax(np.abs(d)), d.shape)
    assert (i, j) == DELTA[:2] and d[i, j] == pytest.approx(DELTA[2], rel=1e-9)
    others = np.delete(np.abs(d).ravel(), i * S + j)
    assert np.nanmax(others) < 1e-9
    assert re.search(r"^\s+5\s+2\s+\S+\s+\S+\s+\+1\.000e\+01$", out, re.M), out


@pytest.mark.parametrize("cmd,name", [(main_show, "show"), (main_report, "report")])
def test_missing_dir_error(cmd, name, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert cmd([missing]) == 1
    err = capsys.readouterr().err
    assert f"raysens {name}: error:" in err and "does not exist" in err and missing in err


def test_not_a_run_dir_errors(tmp_path, run_a, capsys):
    (tmp_path / "empty").mkdir()
    assert main_show([str(tmp_path / "empty")]) == 1
    assert "raysens show: error:" in capsys.readouterr().err
    assert main_report([str(tmp_path / "empty")]) == 1
    assert "neither a run directory" in capsys.readouterr().err
    assert main_compare([run_a, str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "raysens compare: error:" in err and "not a raysens run directory" in err


def test_compare_without_common_layer(tmp_path, run_a, capsys):
    other = make_run(tmp_path / "other", layers=(3,))
    assert main_compare([run_a, other, "--out", str(tmp_path / "c")]) == 1
    assert "share no layer" in capsys.readouterr().err


def test_usage_errors_return_2(capsys):
    assert main_compare(["only-one"]) == 2
    assert main_show(["--help"]) == 0
    assert "raysens show" in capsys.readouterr().out


def _show(path, capsys) -> str:
    assert main_show([path]) == 0
    return capsys.readouterr().out


def test_k1_never_states_a_probe_share(tmp_path, capsys):
    """Issue 17: with one probe per sample the probe noise is not separable from the variation across
    samples: show and report say so instead of "probe part 0%"; a K=4 run states the measured share."""
    k1 = make_run(tmp_path / "k1", num_probes=1)
    out = _show(k1, capsys)
    assert "probe part unknown (K=1; use K ≥ 2)" in out and "probe part 0" not in out
    assert main_report([k1]) == 0
    html = open(os.path.join(k1, "report", "report.html"), encoding="utf-8").read()
    assert "the probe noise cannot be separated from the variation across samples" in html
    assert "unknown (K=1; use K ≥ 2)" in html
    from raysens.report import plots

    run = load_run(k1)
    assert plots._std_title(run, run[2]) == "std over samples (incl. probe noise of unknown size: K=1)"

    k4 = make_run(tmp_path / "k4", num_probes=4)
    out = _show(k4, capsys)
    x = maps(2)
    n, mean = x.shape[0], x.mean(0)
    ok = (np.tril(np.ones((S, S), bool))) & (mean > 0)
    share = np.median(np.sqrt((0.02 * x).mean(0)[ok] / n) / mean[ok])  # numpy: sqrt(mean probe var / n) / mean
    m = re.search(r"probe part ([0-9.]+)%", out)
    assert m and abs(float(m.group(1)) - 100 * share) <= 0.05, (m and m.group(1), 100 * share)  # 2 significant digits
    assert "unknown" not in out
    from raysens.report import analysis as an

    assert an.probe_noise_known({"estimator": "exact", "num_probes": 1})
    assert not an.probe_noise_known({"estimator": "hutchinson", "num_probes": 1})
    assert an.probe_noise_known({"estimator": "hutchinson", "num_probes": 2})
