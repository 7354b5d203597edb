"""A sweep whose base config is planned (``sensitivity.budget``, docs/DESIGN.md §1.11), in-process
(``cluster.use_ray: false``: the sweep's real path, one pass per model, without Ray): every point
plans on its own (one pilot, its own ``plan.json`` equal to its manifest's ``plan``) and equals a
standalone planned run of its config bit for bit, plan included; ``sweep.json`` and the sweep report
list each point's plan; a restart after an interruption skips the finished points and resumes the
others with their stored plans, never running a pilot again."""

from __future__ import annotations

import json
import os

import pytest

from pipeline_util import assert_same_stats
from raysens.run import grid, planning
from raysens.run import sweep as runsweep
from raysens.run.runner import run_local, with_overrides
from raysens.testing import faults

N = 8  # samples per point (the pilot takes the first 4)
BATCH = 4  # -> 2 units per point
MODELS = ["random:tiny-gpt2", "random:tiny-llama"]
SEQ_LENS = [8, 12]


def sweep_dict(out) -> dict:
    return {
        "name": "planned",
        "dir": str(out),
        "base": {"data": {"limit": N},
                 "sensitivity": {"estimator": "hutchinson", "num_probes": 2, "budget": 3, "pilot_samples": 4},
                 # ship_every_units=1: one partial per unit (counted below); not in the fingerprint
                 "cluster": {"use_ray": False, "batch_size": BATCH, "ship_every_units": 1},
                 "output": {"plots": False, "progress_every_s": 0}},
        "grid": {"models": MODELS, "seq_lens": SEQ_LENS, "layers": "all"},
    }


def _plan_file(run_dir) -> dict:
    return json.loads(open(os.path.join(run_dir, planning.PLAN_FILE)).read())


def _without_wall(plan: dict) -> dict:
    plan = json.loads(json.dumps(plan))
    plan["pilot"].pop("wall_s")
    return plan


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    return grid.expand(grid.sweep_from_dict(sweep_dict(tmp_path_factory.mktemp("unused"))))


@pytest.fixture(scope="module")
def standalone(points, tmp_path_factory):
    """Each point's config as a standalone planned run (its own pilot) through ``run_local``."""
    base = tmp_path_factory.mktemp("standalone")
    return {p.name: run_local(with_overrides(p.config, output={"dir": str(base / p.name)})).load() for p in points}


def _check_point_against_standalone(run_dir, point, ref):
    """The point's plan.json is its manifest's plan, covers its layers, is its own (its fingerprint)
    and is the standalone run's plan; its statistics are the standalone run's, bit for bit."""
    plan = _plan_file(run_dir)
    m = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert m["status"] == "complete" and m["plan"] == plan
    assert plan["fingerprint"] == m["fingerprint"] == point.config.fingerprint()
    assert [int(s.split(":")[0]) for s in plan["layer_plan"]] == list(point.config.layers) == [1, 2]
    assert sorted(map(int, plan["layers"])) == [1, 2]
    assert plan["objective"] == "budget" and plan["n_samples"] == N and plan["pilot"]["sample_ids"] == [0, 1, 2, 3]
    assert "layer_plan" not in m["config"]["sensitivity"]  # the config as written
    assert _without_wall(plan) == _without_wall(ref.manifest["plan"])
    from raysens.store.results import load_run

    run = load_run(run_dir)
    assert_same_stats(run, ref, rtol=0.0)  # exact state: bit for bit
    assert all(run[L].count == N for L in run.layers)
    return plan


def test_planned_sweep_plans_each_point_and_matches_standalone_runs(points, standalone, tmp_path):
    from raysens.report.content import sweep_overview
    from raysens.report.render import Doc, to_markdown

    out = tmp_path / "s"
    s = runsweep.run_sweep(grid.sweep_from_dict(sweep_dict(out)))
    m = s.manifest
    assert m["status"] == "complete" and m["backend"] == "local"
    assert [c["name"] for c in m["points"]] == [p.name for p in points] == list(standalone)
    assert [g["model"] for g in m["groups"]] == MODELS  # one pass per model, planned points included
    plans = {}
    for p, c in zip(points, m["points"]):
        assert c["status"] == "complete" and c["this_run"] == "new"
        plans[p.name] = plan = _check_point_against_standalone(s.run_dir(p.name), p, standalone[p.name])
        # sweep.json lists the point's own plan, made by this invocation's pilot
        assert c["plan"] == planning.plan_summary(plan, "pilot")
        assert c["plan"]["layer_plan"] == plan["layer_plan"] and c["plan"]["feasible"] is True
        assert c["plan"]["relative_to_auto_k1"] <= 3 + 1e-9
    assert json.load(open(out / "sweep.json"))["points"] == m["points"]
    # one plan per point, not one shared plan: each carries its own fingerprint, and the pilots saw
    # different models and sequence lengths
    assert len({p["fingerprint"] for p in plans.values()}) == len(points)
    assert len({json.dumps(p["layers"], sort_keys=True) for p in plans.values()}) == len(points)

    # the sweep report's overview table (raysens report SWEEP_DIR; the plots of the full report are
    # left out: slow here) names each point's plan
    doc = Doc("t")
    sweep_overview(doc, [p.name for p in points], [s.load(p.name) for p in points])
    md = to_markdown(doc).replace("`", "")
    for p in points:
        lp = plans[p.name]["layers"]
        cell = "hutchinson, planned: " + "; ".join(f"{L} {lp[str(L)]['mode']} K={lp[str(L)]['num_probes']}"
                                                     for L in (1, 2))
        assert f"| {p.name} |" in md and cell in md


def test_interrupted_planned_sweep_resumes_with_its_plans(points, standalone, tmp_path, monkeypatch):
    out = tmp_path / "s"
    sweep = grid.sweep_from_dict(sweep_dict(out))
    names = [p.name for p in points]
    # 1) interrupted after 3 units (in-process: a deterministic unit order). Every point was planned
    #    before the first unit (one pilot per point, before the backend starts): tiny-gpt2 S8 is
    #    complete (2 units), S12 has 1 of its 2 partials, the tiny-llama points have their plan only
    monkeypatch.setenv(faults.INTERRUPT, "3")
    with pytest.raises(faults.SimulatedInterrupt):
        runsweep.run_sweep(sweep)
    monkeypatch.delenv(faults.INTERRUPT)
    state = json.load(open(out / "sweep.json"))
    assert state["status"] == "interrupted"
    assert [c["status"] for c in state["points"]] == ["complete", "interrupted", "interrupted", "interrupted"]
    assert all(c["plan"]["this_run"] == "pilot" for c in state["points"])
    stored = {n: (out / n / planning.PLAN_FILE).read_bytes() for n in names}  # all four planned
    for n in names:  # the interrupted manifests carry their plans too
        assert json.load(open(out / n / "manifest.json"))["plan"] == json.loads(stored[n])
    assert len(os.listdir(out / names[1] / "partials")) == 1
    assert not any(os.path.exists(out / n / "partials") for n in names[2:])
    done = (out / names[0] / "manifest.json").read_bytes()

    # 2) the restart: no pilot anywhere; the finished point is skipped untouched; the others run
    #    their stored plans and come out equal to the standalone runs (plans included)
    def no_pilot(*a, **k):
        raise AssertionError("a restarted planned sweep ran a pilot again")

    monkeypatch.setattr(planning, "make_layer_plan", no_pilot)
    s = runsweep.run_sweep(sweep)
    c = {e["name"]: e for e in s.manifest["points"]}
    assert [c[n]["this_run"] for n in names] == ["skipped (already complete)", "resumed", "new", "new"]
    assert (out / names[0] / "manifest.json").read_bytes() == done
    assert c[names[0]]["plan"] == planning.plan_summary(json.loads(stored[names[0]]))  # from its manifest
    assert "this_run" not in c[names[0]]["plan"]
    for n in names[1:]:
        assert c[n]["plan"]["this_run"] == planning.PLAN_FILE
    for p in points:
        assert (out / p.name / planning.PLAN_FILE).read_bytes() == stored[p.name]  # never re-planned
        _check_point_against_standalone(str(out / p.name), p, standalone[p.name])
    m1 = json.load(open(out / names[1] / "manifest.json"))
    assert m1["units"]["reused"] == 1 and m1["units"]["computed_this_run"] == 1
    assert s.manifest["samples"]["computed_this_run"] == N - BATCH + 2 * N
