"""The actor pool's strategy (``ray_pool._pool_strategy``): a fixed pool hands each actor one unit at a
time; an autoscaling pool hands enough to reach Ray Data's upscaling threshold, or it never grows
(tests/e2e/test_two_nodes.py::test_autoscaling_pool_grows_onto_a_node_added_mid_run is the run)."""

from __future__ import annotations

import pytest

from pipeline_util import config

pytestmark = pytest.mark.ray


def test_autoscaling_pool_can_reach_the_upscaling_threshold(tiny_model, tmp_path):
    import ray

    from raysens.backends import ray_pool

    fixed = ray_pool._pool_strategy(ray, config(tiny_model, tmp_path / "a", "--cluster.num_actors=2").cluster)
    assert fixed.max_tasks_in_flight_per_actor == 1 and fixed.min_size == fixed.max_size == 2
    auto = ray_pool._pool_strategy(ray, config(tiny_model, tmp_path / "b", "--cluster.num_actors=1",
                                               "--cluster.max_actors=3").cluster)
    threshold = ray.data.DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
    assert (auto.min_size, auto.max_size) == (1, 3)
    assert auto.max_tasks_in_flight_per_actor >= threshold  # utilisation = units in flight per actor
