"""The driver of a Ray run never loads the model nor reads a weight file (issue 31): a planned run's
pilot and the model's content identity are computed in a Ray task with a pool actor's resources
(``raysens.backends.remote``), and give exactly what the in-process path gives."""

from __future__ import annotations

import functools

import pytest

from pipeline_util import KEEP, config
from raysens.run import planning
from raysens.run.prepare import prepare
from raysens.run.runner import run, run_local

pytestmark = pytest.mark.ray

PLANNED = ("--data.limit=8", "--cluster.batch_size=4", "--sensitivity.budget=3", "--sensitivity.num_probes=2",
           "--sensitivity.pilot_samples=4")


def _without_timing(plan: dict) -> dict:
    return {**plan, "pilot": {k: v for k, v in plan["pilot"].items() if k not in ("wall_s", "ran_in")}}


def _driver_must_not_touch_weights(monkeypatch):
    """In this (the driver's) process, loading a model or digesting a weight file fails the test;
    Ray's workers import their own, untouched, modules."""
    import raysens.core.models.loading as loading
    import raysens.core.models as models
    import raysens.core.models.identity as weights

    def refuse(*a, **k):
        raise AssertionError("the driver loaded the model or read a weight file")

    for mod, name in ((models, "load_model"), (loading, "load_base_model"), (weights, "file_digest"),
                      (weights, "sample_digest"), (weights, "_check_safetensors")):
        monkeypatch.setattr(mod, name, refuse)


def test_pilot_in_a_ray_task_gives_the_local_plan(ray_session, tiny_model, tmp_path):
    from raysens.backends.remote import on_worker

    cfg = config(tiny_model, tmp_path / "r", *PLANNED, "--cluster.use_ray=true")
    rp = prepare(cfg)
    local = planning.make_layer_plan(cfg, rp)
    remote = planning.make_layer_plan(cfg, rp, functools.partial(on_worker, cfg.cluster, cfg.model.device))
    assert local["pilot"]["ran_in"] == "driver" and remote["pilot"]["ran_in"] == "ray task"
    assert _without_timing(remote) == _without_timing(local)
    assert local["layer_plan"] and local["pilot"]["sample_ids"] == [0, 1, 2, 3]


def test_planned_ray_run_driver_never_touches_the_model(ray_session, tiny_model, tmp_path, monkeypatch):
    """A model saved to a directory, a planned Ray run: the plan and the model identity in its
    manifest equal the in-process run's, with model loading and weight reading refused here."""
    from raysens.core.models import load_model

    lm = load_model(tiny_model)
    mdir = tmp_path / "model"
    lm.model.save_pretrained(mdir)
    lm.tokenizer.save_pretrained(mdir)
    ref = run_local(config(str(mdir), tmp_path / "local", *PLANNED)).manifest
    _driver_must_not_touch_weights(monkeypatch)
    got = run(config(str(mdir), tmp_path / "ray", *PLANNED, "--cluster.use_ray=true", "--cluster.num_actors=1")).manifest
    assert got["status"] == "complete" and got["backend"]["backend"] == "ray"
    assert got["plan"]["pilot"]["ran_in"] == "ray task" and ref["plan"]["pilot"]["ran_in"] == "driver"
    assert _without_timing(got["plan"]) == _without_timing(ref["plan"])
    assert got["inputs"]["model"] == ref["inputs"]["model"]
    assert {f["file"] for f in got["inputs"]["model"]["files"]} >= {"config.json", "model.safetensors"}
    with open(tmp_path / "ray" / "manifest.json") as f:  # what a resume compares against
        assert '"model.safetensors"' in f.read()


def test_ray_resume_with_other_weights_is_refused(ray_session, tiny_model, tmp_path):
    import torch

    from raysens.core.models import load_model
    from raysens.store.rundir import RunError

    lm = load_model(tiny_model)
    mdir = tmp_path / "model"
    lm.model.save_pretrained(mdir)
    lm.tokenizer.save_pretrained(mdir)
    args = ("--data.limit=4", "--cluster.batch_size=2", "--cluster.use_ray=true", "--cluster.num_actors=1", KEEP,
            "--cluster.ship_every_units=1")
    run(config(str(mdir), tmp_path / "ray", *args))
    parts = sorted((tmp_path / "ray" / "partials").glob("*.npz"))
    assert len(parts) == 2
    parts[-1].unlink()  # one unit left to compute: the resume needs the weights (a run with none left does not)
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[5] += 1.0
    lm.model.save_pretrained(mdir)
    with pytest.raises(RunError, match=r"model weights of .*model.* changed \(model\.safetensors: size \d+ -> \d+ "
                                       r"bytes, SHA-256 [0-9a-f]{12}… -> [0-9a-f]{12}…\)"):
        run(config(str(mdir), tmp_path / "ray", *args, "--output.resume=true"))


DRIVER = r"""
import json, sys
from raysens.config import load_config
from raysens.run.runner import run
model, out = sys.argv[1], sys.argv[2]
s = run(load_config(None, [f"--model.name={model}", f"--output.dir={out}", "--data.max_seq_len=10", "--layers=[1,-1]",
                           "--output.plots=false", "--output.progress_every_s=0", "--cluster.use_ray=true",
                           "--cluster.num_actors=1", *sys.argv[3:]]))
hwm = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("RESULT " + json.dumps({"status": s.manifest["status"], "torch": "torch" in sys.modules,
                              "transformers": "transformers" in sys.modules, "peak_mb": hwm,
                              "ran_in": s.manifest["plan"]["pilot"]["ran_in"]}))
"""


@pytest.mark.slow
def test_a_planned_ray_runs_driver_imports_neither_torch_nor_transformers(tiny_model, tmp_path):
    """What keeps a Ray driver's memory small whatever the model (``jobs/bench/driver_rss.py``
    measures it for SmolLM2): a fresh driver process runs a planned Ray run and never imports torch
    or transformers (layers from config.json, pilot and identity in a Ray task)."""
    import json
    import os
    import subprocess
    import sys

    from raysens.core.models import load_model

    lm = load_model(tiny_model)
    mdir = tmp_path / "model"
    lm.model.save_pretrained(mdir)
    lm.tokenizer.save_pretrained(mdir)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-c", DRIVER, str(mdir), str(tmp_path / "run"), *PLANNED], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    res = [json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and res, p.stderr[-3000:]
    assert res[0]["status"] == "complete" and res[0]["ran_in"] == "ray task"
    assert not res[0]["torch"] and not res[0]["transformers"], res[0]
