"""Planned runs end to end, in-process (docs/DESIGN.md §1.11): a hand-written or planned
``layer_plan`` gives each layer the statistics of an explicit run with that layer's mode and K; the
plan is in the manifest and in ``plan.json``; a resume reuses it and never re-plans; the plan is
deterministic for a config and corpus; another configuration's ``plan.json`` is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

import raysens
from pipeline_util import assert_same_stats, config
from raysens.run import planning
from raysens.run.runner import run_local
from raysens.store.rundir import RunError
from raysens.testing import faults

BASE = ("--data.limit=8", "--cluster.batch_size=4", "--cluster.use_ray=false")


def _explicit(model, out, layer, mode, k):
    return run_local(config(model, out, *BASE, f"--layers=[{layer}]", f"--sensitivity.mode={mode}",
                            f"--sensitivity.num_probes={k}")).load()[layer]


def _check_layers_match_explicit_runs(model, tmp_path, run, layer_plan):
    for item in layer_plan:
        L, mode, k = item.split(":")
        L, k = int(L), int(k)
        ref = _explicit(model, tmp_path / f"explicit_{L}", L, mode, k)
        got = run[L]
        assert got.count == ref.count == 8
        for key in ("mean", "var", "var_corrected", "probe_noise"):
            np.testing.assert_allclose(getattr(got, key), getattr(ref, key), rtol=1e-5, atol=1e-12, equal_nan=True,
                                       err_msg=f"layer {L} {key}")
        ok = got.cell_count >= 2
        if k >= 2:  # probe noise measured: the corrected variance is var minus it (clamped at 0)
            assert (got.probe_noise[ok] > 0).any()
            np.testing.assert_allclose(got.var_corrected[ok], np.maximum(got.var[ok] - got.probe_noise[ok], 0),
                                       rtol=1e-6, atol=1e-12)
            assert (got.var_corrected[ok] < got.var[ok]).any()


def test_hand_written_layer_plan_runs_each_layer_in_its_own_mode(tiny_model, tmp_path):
    plan = ["1:forward:2", "2:reverse:3"]
    cfg = config(tiny_model, tmp_path / "run", *BASE, f"--sensitivity.layer_plan={json.dumps(plan)}")
    run = run_local(cfg).load()
    m = run.manifest
    assert m["status"] == "complete" and m["config"]["sensitivity"]["layer_plan"] == plan
    assert "plan" not in m and not (tmp_path / "run" / planning.PLAN_FILE).exists()  # nothing planned
    _check_layers_match_explicit_runs(tiny_model, tmp_path, run, plan)


def _planned(model, out, *extra):
    return config(model, out, *BASE, "--sensitivity.budget=3", "--sensitivity.num_probes=2",
                  "--sensitivity.pilot_samples=4", *extra)  # a pilot of half the run


def test_planned_run_resume_reuses_the_plan(tiny_model, tmp_path, monkeypatch):
    ref = run_local(_planned(tiny_model, tmp_path / "ref")).load()
    plan = json.loads((tmp_path / "ref" / planning.PLAN_FILE).read_text())
    m = ref.manifest
    assert m["status"] == "complete" and m["plan"] == plan
    assert plan["objective"] == "budget" and plan["feasible"] and plan["cost"]["relative_to_auto_k1"] <= 3 + 1e-9
    assert [int(s.split(":")[0]) for s in plan["layer_plan"]] == sorted(ref.layers) == [1, 2]
    assert all(int(s.split(":")[2]) >= 2 for s in plan["layer_plan"])  # num_probes: the smallest K
    assert plan["pilot"]["sample_ids"] == [0, 1, 2, 3] and plan["n_samples"] == 8
    assert "layer_plan" not in m["config"]["sensitivity"]  # the fingerprint is the config's as written
    _check_layers_match_explicit_runs(tiny_model, tmp_path, ref, plan["layer_plan"])

    # the same config and corpus elsewhere: the same plan (the pilot's wall time aside)
    out = tmp_path / "run"
    monkeypatch.setenv(faults.INTERRUPT, "1")
    with pytest.raises(faults.SimulatedInterrupt):
        run_local(_planned(tiny_model, out))
    monkeypatch.delenv(faults.INTERRUPT)
    again = json.loads((out / planning.PLAN_FILE).read_text())
    for p in (plan, again):
        p["pilot"].pop("wall_s")
    assert again == plan

    # the resume: no pilot, the stored plan, and the statistics of the uninterrupted run
    def no_pilot(*a, **k):
        raise AssertionError("a resume ran the pilot again")

    monkeypatch.setattr(planning, "make_layer_plan", no_pilot)
    stored = json.loads((out / planning.PLAN_FILE).read_text())
    res = run_local(_planned(tiny_model, out)).load()
    assert res.manifest["status"] == "complete" and res.manifest["plan"] == stored
    assert_same_stats(res, ref, rtol=1e-6)


def test_plan_of_another_configuration_is_refused(tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / planning.PLAN_FILE).write_text(json.dumps({"fingerprint": "0123456789abcdef", "layer_plan": ["1:reverse:1"]}))
    with pytest.raises(RunError, match="plan.json belongs to another configuration"):
        run_local(_planned(tiny_model, out))


def test_target_plan_meets_its_prediction_in_the_report(tiny_model, tmp_path):
    """A target run: the report's table shows each layer's mode, K, predicted and achieved SE."""
    from raysens.report.content import build_report
    from raysens.report.render import to_markdown

    cfg = config(tiny_model, tmp_path / "run", *BASE, "--sensitivity.target_rel_se=0.5",
                 "--sensitivity.target_error=probe")
    run = run_local(cfg).load()
    plan = run.manifest["plan"]
    assert plan["objective"] == "target" and plan["target_error"] == "probe"
    md = to_markdown(build_report("run", str(tmp_path / "run"), [run]))
    assert "predicted relative SE" in md
    for L, p in plan["layers"].items():
        assert f"| {L} | {p['mode']} | {p['num_probes']} |" in md.replace("`", "")
