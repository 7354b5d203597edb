"""A planned run's report facts (docs/DESIGN.md §1.11): each layer's mode and K come from the
manifest's plan (or a hand-written layer_plan), and the probe noise counts as measured per layer
exactly where that layer's K ≥ 2."""

from __future__ import annotations

from raysens.report import analysis as an


def test_layer_plans_from_the_planner_and_by_hand():
    planned = {"config": {"sensitivity": {"estimator": "hutchinson", "num_probes": 1, "budget": 2.0}},
               "plan": {"layers": {"1": {"mode": "forward", "num_probes": 1, "predicted_rel_se": 0.1},
                                   "15": {"mode": "reverse", "num_probes": 4, "predicted_rel_se": 0.2}}}}
    plans = an.layer_plans(planned)
    assert plans == {1: {"mode": "forward", "num_probes": 1, "predicted_rel_se": 0.1},
                     15: {"mode": "reverse", "num_probes": 4, "predicted_rel_se": 0.2}}
    f = an.run_facts(planned)
    assert [an.probe_noise_known(f, an.layer_probes(f, plans, L)) for L in (1, 15)] == [False, True]
    by_hand = {"config": {"sensitivity": {"estimator": "hutchinson", "num_probes": 1,
                                          "layer_plan": ["2:reverse:3", "5:forward:1", "bad"]}}}
    assert an.layer_plans(by_hand) == {2: {"mode": "reverse", "num_probes": 3}, 5: {"mode": "forward", "num_probes": 1}}
    plain = {"config": {"sensitivity": {"estimator": "hutchinson", "num_probes": 2}}}
    f = an.run_facts(plain)
    assert an.layer_plans(plain) == {} and an.probe_noise_known(f, an.layer_probes(f, {}, 3))
    f = an.run_facts({"config": {"sensitivity": {"estimator": "exact"}}})
    assert an.probe_noise_known(f, 1)  # deterministic estimators: nothing unknown whatever K says
