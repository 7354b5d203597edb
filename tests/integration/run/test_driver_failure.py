"""A driver killed mid-run (a real process exit, embedded local Ray) resumes from its persisted
partials in the same output directory, recomputes only what is missing and matches an
uninterrupted run; an unreachable cluster address is a clear, fast error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_util import KEEP, assert_same_stats, config
from raysens.backends import ClusterError
from raysens.run.runner import run, run_local

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.ray


def _job(cfg_path, *extra, env=None, timeout=400):
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "run.py"), str(cfg_path), *extra], env=e,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_driver_killed_then_resumed(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"""
model: {{name: {tiny_model}}}
data: {{limit: 24, max_seq_len: 10}}
layers: [1, -1]
cluster: {{num_actors: 1, batch_size: 3, ship_every_units: 2, ship_every_s: 3600}}
output: {{dir: {out}, plots: false, progress_every_s: 0, compact_every: 0}}
""")
    # the actor folds 2 units per shipment: the driver exits once 4 units (2 shipments) are persisted
    p = _job(cfg, env={"RAYSENS_TEST_DRIVER_EXIT_AFTER_UNITS": "4"})
    assert p.returncode == 3, p.stderr[-3000:]
    persisted = sorted(n for n in os.listdir(out / "partials") if n.endswith(".npz"))
    assert len(persisted) == 2
    assert json.load(open(out / "manifest.json"))["status"] == "running"

    p = _job(cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stderr and "4/8 units already done" in p.stderr
    m = json.load(open(out / "manifest.json"))
    assert m["status"] == "complete"
    assert m["units"]["reused"] == 4 and m["units"]["computed_this_run"] == 4
    assert m["samples"]["computed"] == 24 and m["timings"]["samples_this_run"] == 12
    assert set(persisted) <= set(os.listdir(out / "partials"))  # the first run's partials were kept as they were

    ref = run_local(config(tiny_model, tmp_path / "ref", "--data.limit=24", "--cluster.batch_size=3"))
    assert ref.manifest["fingerprint"] == m["fingerprint"]
    from raysens.store.results import load_run

    assert_same_stats(load_run(str(out)), ref.load(), rtol=0.0)  # exact state: bit for bit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ray_session():
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_unreachable_cluster_is_a_clear_fast_error(no_ray_session, tiny_model, tmp_path, monkeypatch):
    port = _free_port()
    t = time.perf_counter()
    with pytest.raises(ClusterError, match=f"cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        run(config(tiny_model, tmp_path / "r", "--data.limit=3", f"--cluster.address=127.0.0.1:{port}"))
    assert time.perf_counter() - t < 30
    assert not (tmp_path / "r" / "partials").exists()
    with pytest.raises(ClusterError, match="ray job submit"):
        run(config(tiny_model, tmp_path / "r", "--data.limit=3", "--cluster.address=http://127.0.0.1:8265"))
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    with pytest.raises(ClusterError, match="cannot reach"):
        run(config(tiny_model, tmp_path / "r", "--data.limit=3"))


def test_unreachable_cluster_keeps_persisted_partials(no_ray_session, tiny_model, tmp_path):
    d = tmp_path / "r"
    run_local(config(tiny_model, d, "--data.limit=6", "--cluster.batch_size=3", KEEP))
    first = sorted(os.listdir(d / "partials"))
    os.remove(d / "partials" / first[0])
    with pytest.raises(ClusterError):
        run(config(tiny_model, d, "--data.limit=6", "--cluster.batch_size=3", f"--address=127.0.0.1:{_free_port()}"))
    assert sorted(os.listdir(d / "partials")) == first[1:]
