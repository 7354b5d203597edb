"""The mode (forward / reverse) used by the engine is recorded in every partial's meta and in the
manifest, and is part of the run fingerprint (docs/DESIGN.md §1.10, §6). In-process, no Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline_util import KEEP, config
from raysens.run.runner import run_local
from raysens.store.partials import decode_partial
from raysens.store.results import load_run


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_mode_is_recorded_in_partials_and_manifest(tiny_model, tmp_path, mode):
    cfg = config(tiny_model, tmp_path / "run", "--data.limit=6", "--cluster.batch_size=3",
                 f"--sensitivity.mode={mode}", "--cluster.use_ray=false", KEEP)
    run_local(cfg)
    d = tmp_path / "run"
    m = json.load(open(d / "manifest.json"))
    assert m["status"] == "complete" and m["backend"]["modes"] == [mode]
    assert m["config"]["sensitivity"]["mode"] == mode
    names = sorted(p for p in os.listdir(d / "partials") if p.endswith(".npz"))
    assert names
    for name in names:
        p = decode_partial((d / "partials" / name).read_bytes(), name=name)
        assert p.meta["mode"] == mode
    run = load_run(str(d))
    assert all(np.isfinite(run[L].mean[0, 0]) for L in run.layers)


def test_mode_is_part_of_the_fingerprint(tiny_model, tmp_path):
    fp = {m: config(tiny_model, tmp_path, f"--sensitivity.mode={m}").fingerprint() for m in ("auto", "forward", "reverse")}
    assert len(set(fp.values())) == 3
