"""The Ray Data pipeline on a local Ray (CPU): bit-for-bit equivalence with the in-process core for 1,
2 and 4 actors, two batch sizes and several units per shipment (actor-local accumulation), and an
actor killed mid-run (its unshipped units recomputed)."""

from __future__ import annotations

import os

import pytest

from pipeline_util import KEEP, assert_same_stats, config
from raysens.run.runner import run, run_local

pytestmark = pytest.mark.ray
N = 24
MERGE_RTOL = 0.0  # the state is exact (integer sums, issue 18): bit for bit, whatever the actors or shipments


@pytest.fixture(scope="module")
def local_runs(tiny_model, tmp_path_factory):
    """In-process core (no Ray) for batch sizes 3 and 8, one shipment (partial) per unit."""
    base = tmp_path_factory.mktemp("local")
    return {b: run_local(config(tiny_model, base / f"b{b}", f"--data.limit={N}", f"--cluster.batch_size={b}", KEEP,
                                "--cluster.ship_every_units=1"))
            for b in (3, 8)}


def test_in_process_batch_sizes_agree(local_runs):
    assert_same_stats(local_runs[3].load(), local_runs[8].load(), rtol=MERGE_RTOL)


def test_in_process_shipments_do_not_change_a_bit(local_runs, tiny_model, tmp_path):
    """One shipment per unit vs all 8 units folded into one shipment (auto: 16 on CPU): the same bits."""
    s = run_local(config(tiny_model, tmp_path / "r", f"--data.limit={N}", "--cluster.batch_size=3", KEEP,
                         "--cluster.ship_every_s=3600"))  # no time-based shipment on a loaded machine
    assert len([n for n in os.listdir(s.run_dir + "/partials") if n.endswith(".npz")]) == 1
    assert len([n for n in os.listdir(local_runs[3].run_dir + "/partials") if n.endswith(".npz")]) == N // 3
    assert_same_stats(s.load(), local_runs[3].load())


@pytest.mark.parametrize("batch,actors,ship", [(3, 1, "auto"), (8, 1, "1"), (3, 2, "2"), (8, 2, "auto"), (3, 4, "2")])
def test_ray_matches_in_process_core(ray_session, local_runs, tiny_model, tmp_path, actors, batch, ship):
    # the session has 4 logical CPUs: 4 actors at 1 CPU each leave none to the tokenize tasks (a hang)
    cpus = 1 if actors <= 2 else 0.5
    s = run(config(tiny_model, tmp_path / "r", f"--data.limit={N}", f"--cluster.batch_size={batch}",
                   f"--cluster.num_actors={actors}", f"--cluster.cpus_per_actor={cpus}",
                   f"--cluster.ship_every_units={ship}"))
    assert s.manifest["backend"]["backend"] == "ray" and s.manifest["backend"]["num_actors"] == actors
    assert s.manifest["samples"]["computed"] == N
    assert s.manifest["fingerprint"] == local_runs[batch].manifest["fingerprint"]
    assert_same_stats(s.load(), local_runs[batch].load(), rtol=MERGE_RTOL)
    assert_same_stats(s.load(), local_runs[11 - batch].load(), rtol=MERGE_RTOL)  # and the other batch size


def test_killed_actor_every_sample_counted_once(ray_session, local_runs, tiny_model, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv("RAYSENS_TEST_KILL_AFTER_UNITS", "2")
    monkeypatch.setenv("RAYSENS_TEST_KILL_MARKER", str(marker))
    s = run(config(tiny_model, tmp_path / "r", f"--data.limit={N}", "--cluster.batch_size=3",
                   "--cluster.num_actors=2", "--cluster.cpus_per_actor=1", "--cluster.ship_every_units=3"))
    assert marker.exists(), "the fault hook did not fire: no actor was killed"
    pid = int(marker.read_text())
    assert pid != os.getpid()
    m = s.manifest
    assert m["samples"]["computed"] == N and m["units"]["computed_this_run"] == N // 3
    run_ = s.load()
    for L in run_.layers:
        assert run_[L].count == N and run_[L].cell_count[0, 0] == N  # exactly once each
    assert_same_stats(run_, local_runs[3].load(), rtol=MERGE_RTOL)


def test_resume_after_partial_loss_on_ray(ray_session, local_runs, tiny_model, tmp_path):
    import shutil

    d = tmp_path / "r"
    shutil.copytree(local_runs[8].run_dir, d)  # a run written by the in-process path ...
    names = sorted(n for n in os.listdir(d / "partials") if n.endswith(".npz"))
    os.remove(d / "partials" / names[1])
    s = run(config(tiny_model, d, f"--data.limit={N}", "--cluster.batch_size=8"))  # ... resumed on Ray
    assert s.manifest["units"]["computed_this_run"] == 1 and s.manifest["units"]["reused"] == 2
    assert_same_stats(s.load(), local_runs[8].load(), rtol=MERGE_RTOL)


def test_planned_run_on_ray_matches_in_process(ray_session, tiny_model, tmp_path):
    """A planned run (budget; docs/DESIGN.md §1.11) on Ray: the same plan (its pilot run in a Ray task)
    and the same statistics as in process; the actors run each layer in its own mode and K."""
    import json

    extra = ("--data.limit=8", "--cluster.batch_size=4", "--sensitivity.budget=3", "--sensitivity.num_probes=2")
    loc = run_local(config(tiny_model, tmp_path / "local", *extra))
    s = run(config(tiny_model, tmp_path / "ray", *extra, "--cluster.num_actors=1", "--cluster.cpus_per_actor=1"))
    assert s.manifest["backend"]["backend"] == "ray" and s.manifest["status"] == "complete"
    a, b = (json.loads((tmp_path / d / "plan.json").read_text()) for d in ("local", "ray"))
    assert a["pilot"]["ran_in"] == "driver" and b["pilot"]["ran_in"] == "ray task"  # issue 31: a pilot in a Ray task
    for p in (a, b):
        p["pilot"].pop("wall_s"), p["pilot"].pop("ran_in")
    assert a == b and s.manifest["plan"]["layer_plan"] == a["layer_plan"]
    assert_same_stats(s.load(), loc.load(), rtol=MERGE_RTOL)
