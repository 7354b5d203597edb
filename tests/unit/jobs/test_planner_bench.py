"""``python -m jobs.experiments.planner`` keeps running (tiny random model, exact maps as the reference):
every planned run stays within its budget, and the pure runs' costs are the cost model's."""

from __future__ import annotations

import math

import pytest

from jobs.experiments import planner
from raysens.core.planning.planner import plan_cost, unit_costs


def test_planner_bench_on_a_tiny_model(tmp_path):
    res = planner.main(["--model", "random:tiny-llama", "--layers", "1", "2", "--samples", "4", "--seq-len", "8",
                        "--seeds", "1", "--pilot", "2", "--fwd-k", "1", "4", "--rev-k", "1", "2", "--budgets", "1", "3",
                        "--cache", str(tmp_path / "exact"), "--json", str(tmp_path / "out.json")])
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"forward K=1", "forward K=4", "reverse K=1", "reverse K=2", "planned budget 1x",
                         "planned budget 3x"}
    rev, fwd = unit_costs([1, 2], seq=8, causal=True, manual_reverse=True, manual_forward=True)
    ref = min(rev[1] + rev[2], fwd[2])
    assert res["auto_k1_cost"] == pytest.approx(ref)
    assert rows["reverse K=2"]["cost"] == pytest.approx(2 * (rev[1] + rev[2]) / ref)
    assert rows["forward K=4"]["cost"] == pytest.approx(4 * fwd[2] / ref)
    for b in (1, 3):
        r = rows[f"planned budget {b}x"]
        assert r["cost"] <= b + 1e-9 and set(r["vs_curves"]) == {"forward", "reverse"}
        choice = {int(s.split(":")[0]): (s.split(":")[1], int(s.split(":")[2])) for s in r["layer_plans"][0]}
        assert plan_cost(choice, rev, fwd) / ref == pytest.approx(r["cost"])
    assert all(0 < r["worst_err"] < 1 and math.isfinite(r["s_per_sample"]) for r in rows.values())
    assert (tmp_path / "out.json").exists()
