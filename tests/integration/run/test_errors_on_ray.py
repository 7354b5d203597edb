"""Issue 28 on local Ray: an error raised in the actor pool's UDF and in a Ray task reaches the driver
as the same class with the same message (carried as data, ``raysens.backends.errors``; no traceback
text parsed). The tokenize step's error: test_hardening_ray.py::test_a_worker_error_under_ray_…"""

from __future__ import annotations

import json
import operator

import pytest

from pipeline_util import config
from raysens.backends.overlap import FoldError
from raysens.run.runner import Runner
from raysens.store.rundir import RunError
from raysens.testing import faults

pytestmark = pytest.mark.ray


def test_an_error_in_the_actor_reaches_the_driver_as_raised(ray_session, tiny_model, tmp_path, bundled_texts,
                                                           monkeypatch):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in bundled_texts[:6]))
    # sample 4's maps made negative on the actor (a test hook passed with the workers' arguments):
    # the fold of its unit fails there, in the background lane, as a FoldError naming the unit
    monkeypatch.setenv(faults.PLANT, "4:-1")
    cfg = config(tiny_model, tmp_path / "run", f"--data.source={src}", "--cluster.batch_size=3",
                 "--cluster.group_by_length=false")  # units of consecutive ids: unit 3 = samples 3, 4, 5
    runner = Runner(use_ray=True)
    runner.open("run", cfg, "now")
    with pytest.raises(FoldError) as ei:
        runner.run()
    assert type(ei.value) is FoldError
    msg = str(ei.value)
    assert msg == ("UnitWorker: the fold of unit 3 failed in the background (ValueError: CellStats.from_batch: values "
                   "must be >= 0 (A_ij = ||J_ij||^2), negative in batch rows [1]); units [3] are not shipped "
                   "(recomputed by the runner, as after a lost actor)")  # unit 3 = samples 3, 4, 5: row 1 is 4
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] == msg


def test_an_error_in_a_ray_task_reaches_the_driver_as_raised(ray_session):
    from raysens.backends.remote import on_worker
    from raysens.config import ClusterConfig
    from raysens.core.models import ModelLoadError, load_model

    with pytest.raises(ModelLoadError) as ei:
        on_worker(ClusterConfig(), "cpu", load_model, "./no/such/model")
    assert type(ei.value) is ModelLoadError
    assert str(ei.value).startswith("load_model: model path './no/such/model' does not exist (")
    with pytest.raises(RunError) as ei:  # not ours: one line naming its type and message
        on_worker(ClusterConfig(), "cpu", operator.truediv, 1, 0)
    assert str(ei.value) == "a Ray worker failed: ZeroDivisionError: division by zero"
