"""Issue 31: a Ray sweep's driver reads no weight file. Restarting a sweep whose points are complete
checks each point's recorded inputs; in a Ray sweep the model's identity must come from a worker
(``backends.remote.on_worker``), never from hashing weights in the driver process. Ray itself is
replaced here by a fake session and a fake worker call (the integration tests run the real one)."""

from __future__ import annotations

import contextlib

import pytest

from raysens import backends
from raysens.backends import remote
from raysens.core.models import identity as weights
from raysens.run import grid
from raysens.run import sweep as runsweep

MODEL = "random:tiny-llama"


def sweep_dict(out, use_ray: bool) -> dict:
    return {"name": "t", "dir": str(out),
            "base": {"data": {"limit": 4}, "cluster": {"use_ray": use_ray, "batch_size": 2},
                     "output": {"plots": False, "progress_every_s": 0}},
            "grid": {"models": [MODEL], "seq_lens": [6, 8], "layers": [1]}}


def test_a_ray_sweep_restart_takes_the_model_identity_from_a_worker(tmp_path, monkeypatch):
    out = tmp_path / "s"
    first = runsweep.run_sweep(grid.sweep_from_dict(sweep_dict(out, use_ray=False)))  # both points complete
    assert [p["status"] for p in first.manifest["points"]] == ["complete", "complete"]
    recorded = first.load(first.points[0]["name"]).manifest["inputs"]["model"]
    real = weights.checked_identity(MODEL)
    assert real == recorded

    def driver_hash(*a, **kw):
        raise AssertionError("the driver hashed the weights")

    monkeypatch.setattr(weights, "model_identity", driver_hash)
    monkeypatch.setattr(weights, "checked_identity", driver_hash)
    calls, answer = [], {"identity": real}

    def on_worker(cluster, device, fn, *args, **kwargs):  # a Ray task: another process, unpatched
        calls.append((fn, args, kwargs))
        return answer["identity"]

    @contextlib.contextmanager
    def session(cluster, use_ray):  # the runner opens none with nothing to compute (use_ray False)
        yield {"address": "fake", "started_here": False, "resources": {}} if use_ray else None

    monkeypatch.setattr(remote, "on_worker", on_worker)
    monkeypatch.setattr(backends, "session", session)
    again = runsweep.run_sweep(grid.sweep_from_dict(sweep_dict(out, use_ray=True)))
    assert [p["this_run"] for p in again.manifest["points"]] == ["skipped (already complete)"] * 2
    assert calls == [(weights.checked_identity, (MODEL,), {"trust_remote_code": False})]  # once for both points
    # the worker's identity is what the check compares: other weights are refused
    answer["identity"] = {**real, "preset": "tiny-gpt2"}
    with pytest.raises(runsweep.SweepError, match="computed from other inputs"):
        runsweep.run_sweep(grid.sweep_from_dict(sweep_dict(out, use_ray=True)))
    assert len(calls) == 2
