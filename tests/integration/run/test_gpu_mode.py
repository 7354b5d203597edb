"""GPU mode decided by the config (issue 31), on a CPU machine whose local Ray declares two GPUs
(``ray.init(num_gpus=2)``, in-process: never ``ray start``) and the test-only device override
(``RAYSENS_TEST_DEVICE_OVERRIDE=cpu``: an actor given a GPU computes on the CPU): the actors request
and get one GPU each, the manifest says GPU mode, ``precision: tf32`` is accepted and the numbers are
those of the in-process fp32 run; with no GPU in the cluster a job that asks for GPUs waits, then
fails in one line without writing anything — never a CPU run."""

from __future__ import annotations

import os

import pytest

from pipeline_util import KEEP, assert_same_stats, config
from raysens.backends.spec import ClusterError
from raysens.run.runner import run, run_local

pytestmark = pytest.mark.ray
N = 24


@pytest.fixture
def ray_with(request):
    """A local Ray declaring ``request.param`` GPUs (shut down after the test)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=request.param, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("ray_with", [2], indirect=True)
def test_gpu_actors_get_one_gpu_each_and_tf32_is_accepted(ray_with, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSENS_TEST_DEVICE_OVERRIDE", "cpu")
    monkeypatch.setenv("RAYSENS_TEST_ACTOR_UNIT_DELAY_S", "0.5")  # both actors get units (units as slow as real ones)
    # ... once both are alive: Ray Data dispatches as soon as ONE pool actor is up, and under load the
    # second one's start (model load) outlasted the 8 units × 0.5 s — the first took every unit and
    # the run had one GPU actor (a flake, "len(gpus) == 2"). Waiting for the pool's minimum before
    # dispatch (what RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S sets in test_two_nodes, read at import:
    # too late here) makes "both actors compute" a property of the run, not of timing.
    from ray.data import DataContext

    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 300)
    common = [f"--data.limit={N}", "--cluster.batch_size=3", KEEP]
    s = run(config(tiny_model, tmp_path / "gpu", *common, "--sensitivity.precision=tf32", "--cluster.num_actors=2",
                   "--cluster.gpus_per_actor=1", "--cluster.cpus_per_actor=0.5", "--cluster.ship_every_units=1"))
    b = s.manifest["backend"]
    assert b["gpu_mode"] is True and b["gpus_per_actor"] == 1.0 and b["gpu_mode_reason"] == "cluster.gpus_per_actor 1"
    gpus = b["gpus_by_actor"]
    assert len(gpus) == 2, gpus  # both actors computed and shipped
    assert all(len(ids) == 1 for ids in gpus.values()) and len({ids[0] for ids in gpus.values()}) == 2  # one GPU each
    assert s.manifest["precision"] == "tf32"  # accepted: the config asks for GPU actors
    assert b["devices"] == ["cpu"]  # the override: where the numbers were computed
    assert s.manifest["samples"]["computed"] == N
    ref = run_local(config(tiny_model, tmp_path / "ref", *common, "--cluster.use_ray=false"))
    assert_same_stats(s.load(), ref.load())  # tf32 on the override's CPU is the fp32 computation, bit for bit


@pytest.mark.parametrize("ray_with", [0], indirect=True)
def test_no_gpu_in_the_cluster_waits_then_fails_in_one_line(ray_with, tiny_model, tmp_path, capfd):
    out = tmp_path / "r"
    with pytest.raises(ClusterError) as err:
        run(config(tiny_model, out, f"--data.limit={N}", "--cluster.num_actors=2", "--cluster.gpus_per_actor=1",
                   "--cluster.gpu_wait_s=3"))
    msg = str(err.value)
    assert "\n" not in msg and "needs 2 GPUs but the Ray cluster has 0 after waiting 3s" in msg
    assert "waiting up to 3s (cluster.gpu_wait_s) for 2 GPUs" in capfd.readouterr().err
    assert not (out / "manifest.json").exists() and not (out / "partials").exists()  # nothing ran, on CPU or anywhere


@pytest.mark.parametrize("ray_with", [0], indirect=True)
def test_auto_without_gpus_runs_on_cpus_and_says_so(ray_with, tiny_model, tmp_path, capfd):
    s = run(config(tiny_model, tmp_path / "r", f"--data.limit=6", "--cluster.batch_size=3"))
    assert s.manifest["backend"]["gpu_mode"] is False and s.manifest["backend"]["gpus_per_actor"] == 0.0
    assert "set cluster.gpus_per_actor: 1 to wait for GPU nodes" in capfd.readouterr().err
