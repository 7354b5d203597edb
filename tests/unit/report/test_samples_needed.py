"""Samples a claim needs (raysens/report/samples_needed.py, ``raysens show --target-se``) on planted stats
whose per-cell relative standard errors are known in closed form."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

from raysens.report import samples_needed as prec
from raysens.report.commands import main_report, main_show
from raysens.store.results import load_run, write_layer_stats, write_manifest
from raysens.stats.welford import WelfordState

S, B = 6, 8
I, J = np.indices((S, S))
LOWER = J <= I  # 21 causal cells
A = np.where(LOWER, 0.05 + 0.02 * (I * S + J) / S, 0.0)  # relative half-amplitude per cell
M = np.where(LOWER, 1.0 + I + 0.5 * J, 0.0)  # cell means
Q = 0.3 * A ** 2  # probe variance per sample, relative to mean²: below the data variance


def planted(layer_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """B samples alternating m(1 + a), m(1 − a) per cell (mean m, unbiased var B m² a² / (B − 1)),
    each with probe variance q m²."""
    sign = np.where(np.arange(B) % 2 == 0, 1.0, -1.0)[:, None, None]
    a = A * layer_scale
    x = M[None] * (1 + sign * a[None])
    noise = np.broadcast_to(Q * layer_scale ** 2 * M ** 2, x.shape).copy()
    return np.where(LOWER[None], x, 0.0), np.where(LOWER[None], noise, 0.0)


def expected(layer_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Closed-form per-cell relative SEs of the planted stats (the 21 cells with a nonzero mean)."""
    a, q = (A * layer_scale)[LOWER], (Q * layer_scale ** 2)[LOWER]
    var_rel = B * a ** 2 / (B - 1)  # var / m²
    return {"rel": np.sqrt(var_rel / B), "data": np.sqrt((var_rel - q) / B), "probe": np.sqrt(q / B)}


def make_run(path, num_probes: int = 4, layers=(1, 5)) -> str:
    for k, L in enumerate(layers):
        x, noise = planted(1.0 + k)
        write_layer_stats(str(path), L, WelfordState.empty(S).update(x, noise=noise if num_probes > 1 else None))
    write_manifest(str(path), {"model": {"name": "toy", "class": "LlamaModel"}, "estimator": "hutchinson",
                               "num_probes": num_probes, "layers": list(layers), "seq_len": S,
                               "samples": {"total": B, "computed": B}})
    return str(path)


def test_relative_errors_match_the_closed_form(tmp_path):
    run = load_run(make_run(tmp_path))
    for k, L in enumerate((1, 5)):
        ls = run[L]
        got = prec.relative_errors(ls.mean, ls.var, ls.var_corrected, ls.probe_noise, ls.cell_count)
        ref = expected(1.0 + k)
        assert got["cells"] == 21
        for part in ("rel", "data", "probe"):
            assert got[f"{part}_median"] == pytest.approx(np.median(ref[part]), rel=1e-9)
            assert got[f"{part}_p90"] == pytest.approx(np.quantile(ref[part], 0.9), rel=1e-9)


@pytest.mark.parametrize("target", [0.01, 0.02, 0.05, 0.5])
def test_samples_needed_reach_the_target_and_no_fewer_do(tmp_path, target):
    run = load_run(make_run(tmp_path))
    p = prec.run_precision(run, target)[5]
    ref = expected(2.0)
    for name, q in (("median", 0.5), ("p90", 0.9)):
        n = p[f"n_needed_{name}"]
        assert n == math.ceil(B * (np.quantile(ref["rel"], q) / target) ** 2)
        # with N samples every cell's relative SE scales by sqrt(B / N): N reaches the target, N − 1 does not
        at = lambda N: np.quantile(ref["rel"] * math.sqrt(B / N), q)  # noqa: E731
        assert at(n) <= target * (1 + 1e-12) and (n == 1 or at(n - 1) > target)
        assert p[f"meets_{name}"] == (n <= B)
        assert p[f"n_needed_data_{name}"] == math.ceil(B * (np.quantile(ref["data"], q) / target) ** 2)


def test_show_target_se_prints_the_numbers(tmp_path, capsys):
    path = make_run(tmp_path)
    assert main_show([path, "--target-se", "0.05", "--rows", "0", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "samples a claim needs: target relative SE 5% per cell" in out
    ref = expected(2.0)
    block = out[out.index("layer 5 (8 samples, 21 cells)"):]
    med = re.search(r"median ([\d.]+)% \(data ([\d.]+)%, probe ([\d.]+)%\): samples needed ([\d,]+)", block)
    assert med, block
    assert float(med.group(1)) == pytest.approx(100 * np.median(ref["rel"]), rel=0.05)
    assert float(med.group(2)) == pytest.approx(100 * np.median(ref["data"]), rel=0.05)
    assert float(med.group(3)) == pytest.approx(100 * np.median(ref["probe"]), rel=0.05)
    assert int(med.group(4).replace(",", "")) == math.ceil(B * (np.median(ref["rel"]) / 0.05) ** 2)
    p90 = re.search(r"p90\s+([\d.]+)% .*: samples needed ([\d,]+) \(([\d.]+)× the run's 8\)", block)
    assert p90 and int(p90.group(2)) == math.ceil(B * (np.quantile(ref["rel"], 0.9) / 0.05) ** 2)
    # a target the run already meets
    assert main_show([path, "--target-se", "0.5", "--layer", "1", "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "(met: the run has 8)" in out and "layer 5 (" not in out


def test_k1_has_no_probe_or_data_part(tmp_path, capsys):
    path = make_run(tmp_path, num_probes=1)
    p = prec.run_precision(load_run(path), 0.05)[1]
    assert math.isnan(p["probe_median"]) and math.isnan(p["data_p90"]) and math.isnan(p["n_needed_data_median"])
    assert p["rel_median"] == pytest.approx(np.median(expected()["rel"]), rel=1e-9)
    assert main_show([path, "--target-se", "0.05", "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "(data unknown, probe unknown): samples needed" in out and "without probe noise" not in out


def test_bad_targets(tmp_path, capsys):
    path = make_run(tmp_path)
    for bad in ("0", "-0.1", "nan"):
        assert main_show([path, "--target-se", bad]) == 1
        assert capsys.readouterr().err.strip() == f"raysens show: error: --target-se must be > 0, got {float(bad)}"
    assert main_report([path, "--target-se", "0"]) == 1
    assert "raysens report: error: --target-se must be > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^precision\.layer_precision: target must be > 0, got -1"):
        prec.layer_precision(load_run(path)[1], -1)


def test_report_has_the_table(tmp_path):
    pytest.importorskip("matplotlib")
    path = make_run(tmp_path)
    assert main_report([path, "--target-se", "0.02"]) == 0
    md = open(os.path.join(path, "report", "report.md"), encoding="utf-8").read()
    assert "## Samples a claim needs" in md and "Target: relative SE 2% per cell." in md
    n = math.ceil(B * (np.median(expected(2.0)["rel"]) / 0.02) ** 2)
    row = next(ln for ln in md.splitlines() if ln.startswith("| 5 | 8 | 21 |"))
    assert f"| {n:,} (" in row
