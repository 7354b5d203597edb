"""GPU mode rules of the Ray backend (``raysens.backends.gpus``, issue 31) with plain functions for the
cluster's GPU count and the autoscaler, a fake clock: requested GPUs are waited for (the autoscaler
asked once), a bounded wait fails in one line, auto follows what the cluster shows. No Ray."""

from __future__ import annotations

import pytest

from raysens.backends import gpus
from raysens.backends.spec import ClusterError
from raysens.config import ClusterConfig


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_resolve_follows_the_config_then_the_cluster():
    assert gpus.resolve(ClusterConfig(gpus_per_actor=1), "auto", 0) == (1.0, True, "cluster.gpus_per_actor 1")
    assert gpus.resolve(ClusterConfig(gpus_per_actor=0), "auto", 8)[:2] == (0.0, False)
    assert gpus.resolve(ClusterConfig(), "cuda", 0)[:2] == (1.0, True)  # model.device cuda requests GPUs
    assert gpus.resolve(ClusterConfig(), "auto", 8)[:2] == (1.0, False)
    assert gpus.resolve(ClusterConfig(), "auto", 0)[:2] == (0.0, False)
    assert gpus.resolve(ClusterConfig(), "cpu", 8)[:2] == (0.0, False)  # a CPU model reserves no GPU


def test_waits_for_gpu_nodes_to_join_and_asks_the_autoscaler_once(capfd):
    clock, asked = Clock(), []
    cl = ClusterConfig(num_actors=4, gpus_per_actor=1, gpu_wait_s=600)
    seen = gpus.await_gpus(cl, 1.0, lambda: 0.0 if clock.t < 100 else 8.0, lambda: asked.append(1),
                           sleep=clock.sleep, clock=clock)
    assert seen == 8.0 and asked == [1] and 100 <= clock.t <= 102
    err = capfd.readouterr().err
    assert "waiting up to 600s (cluster.gpu_wait_s) for 4 GPUs" in err and "8 GPUs up after 10" in err


def test_gpus_already_up_cost_no_wait():
    clock, asked = Clock(), []
    assert gpus.await_gpus(ClusterConfig(num_actors=2, gpus_per_actor=0.5), 0.5, lambda: 1.0, lambda: asked.append(1),
                           sleep=clock.sleep, clock=clock) == 1.0
    assert clock.t == 0 and asked == []


def test_a_bounded_wait_fails_in_one_line():
    clock = Clock()
    with pytest.raises(ClusterError) as err:
        gpus.await_gpus(ClusterConfig(num_actors=8, gpus_per_actor=1, gpu_wait_s=30), 1.0, lambda: 4.0, None,
                        sleep=clock.sleep, clock=clock)
    assert clock.t == pytest.approx(30)
    assert "\n" not in str(err.value) and "needs 8 GPUs but the Ray cluster has 4 after waiting 30s" in str(err.value)


def test_pool_line_checks_the_pool_against_the_gpus():
    line = gpus.pool_line(ClusterConfig(num_actors=4, gpus_per_actor=1), 1.0, 8.0, "x")
    assert line.startswith("GPU actors (x): 4 × 1 GPU on a cluster with 8 GPUs") and "4 GPUs stay idle" in line
    line = gpus.pool_line(ClusterConfig(num_actors=4, max_actors=16, gpus_per_actor=1), 1.0, 8.0, "x")
    assert "4-16 × 1 GPU" in line and "grows past 8 actors only as GPU nodes join" in line
    assert "wait for GPU nodes" in gpus.pool_line(ClusterConfig(), 0.0, 0.0, "auto")


def test_gpu_wait_s_is_checked():
    from raysens.config import ConfigError

    with pytest.raises(ConfigError, match="cluster.gpu_wait_s must be >= 0"):
        ClusterConfig(gpu_wait_s=-1)
