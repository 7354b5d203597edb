"""``sensitivity.precision`` in a run (docs/DESIGN.md §1.12): part of the fingerprint (a resume with
another precision is refused, nothing lost), recorded in the manifest and shown by ``raysens show``;
``tf32`` refused before anything is written when the model is on the CPU. In-process, no Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline_util import config
from raysens.report.commands import format_show
from raysens.run.prepare import RunError
from raysens.run.runner import run_local
from raysens.store.results import load_run


def test_precision_is_part_of_the_fingerprint(tiny_model, tmp_path):
    fp = {p: config(tiny_model, tmp_path, f"--sensitivity.precision={p}").fingerprint() for p in ("fp32", "bf16", "tf32")}
    assert len(set(fp.values())) == 3
    assert fp["fp32"] == config(tiny_model, tmp_path).fingerprint()  # fp32 is the default


def test_bf16_run_is_recorded_and_a_resume_in_fp32_is_refused(tiny_model, tmp_path):
    d = tmp_path / "run"
    cfg = config(tiny_model, d, "--data.limit=4", "--cluster.batch_size=2", "--cluster.use_ray=false",
                 "--sensitivity.precision=bf16", "--sensitivity.estimator=exact")
    run_local(cfg)
    m = json.load(open(d / "manifest.json"))
    assert m["status"] == "complete" and m["precision"] == "bf16"
    assert m["config"]["sensitivity"]["precision"] == "bf16" and m["fingerprint"] == cfg.fingerprint()
    run = load_run(str(d))
    assert "precision bf16" in format_show(run)
    before = {n: (d / "partials" / n).read_bytes() for n in os.listdir(d / "partials")}
    with pytest.raises(RunError, match="different configuration"):
        run_local(config(tiny_model, d, "--data.limit=4", "--cluster.batch_size=2", "--cluster.use_ray=false",
                         "--sensitivity.precision=fp32", "--sensitivity.estimator=exact"))
    assert {n: (d / "partials" / n).read_bytes() for n in os.listdir(d / "partials")} == before
    # the fp32 run of the same config elsewhere: the same maps to bf16's rounding, not bit-equal
    ref = run_local(config(tiny_model, tmp_path / "fp32", "--data.limit=4", "--cluster.batch_size=2",
                           "--cluster.use_ray=false", "--sensitivity.estimator=exact")).load()
    for L in run.layers:
        a, b = run[L].mean, ref[L].mean
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert (0 if L == 0 else 1e-6) <= err <= 2e-2, (L, err)


def test_tf32_on_cpu_is_refused_before_anything_is_written(tiny_model, tmp_path):
    d = tmp_path / "run"
    with pytest.raises(RunError, match="sensitivity.precision is 'tf32'"):
        run_local(config(tiny_model, d, "--data.limit=2", "--cluster.use_ray=false", "--model.device=cpu",
                         "--sensitivity.precision=tf32"))
    assert not d.exists()
