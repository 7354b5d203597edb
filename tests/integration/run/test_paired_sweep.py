"""Issue 29, paired runs in sweeps: a ``paired`` grid axis (null = an ordinary point, a mapping = a
``PairedConfig`` merged over ``base.paired``) and a ``base.paired`` section; an in-process sweep whose
paired point equals the standalone paired run bit for bit and whose unpaired point equals the plain
run (one model pass for both points)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from raysens.config import ConfigError
from raysens.run import grid
from raysens.run import sweep as runsweep
from raysens.run.runner import run_local


def sweep_dict(out, **over) -> dict:
    d = {"name": "p", "dir": str(out),
         "base": {"data": {"limit": 6, "max_seq_len": 8}, "sensitivity": {"num_probes": 2}, "layers": [1, 2],
                  "cluster": {"use_ray": False, "batch_size": 3}, "output": {"plots": False, "progress_every_s": 0},
                  "paired": {"fdr": 0.1}},
         "grid": {"models": ["random:tiny-llama"],
                  "paired": [None, {"scale": {"module": "layers.1.mlp", "factor": 1.5}, "label": "mlp1x1.5"}]}}
    return grid.merge_dicts(d, over)


def test_paired_axis_names_points_and_merges_over_base(tmp_path):
    pts = grid.expand(grid.sweep_from_dict(sweep_dict(tmp_path)))
    assert [p.name for p in pts] == ["tiny-llama__S8__bundled__hutchinson-K2__unpaired",
                                     "tiny-llama__S8__bundled__hutchinson-K2__mlp1x1.5"]
    assert pts[0].config.paired is None and pts[0].axes["paired"] == "unpaired"
    assert pts[1].config.paired.fdr == 0.1 and pts[1].config.paired.scale == {"module": "layers.1.mlp", "factor": 1.5}
    only_base = sweep_dict(tmp_path)
    del only_base["grid"]["paired"]
    (p,) = grid.expand(grid.sweep_from_dict(only_base))  # base.paired alone: every point paired, names unchanged
    assert p.name == "tiny-llama__S8__bundled__hutchinson-K2" and p.config.paired.fdr == 0.1


@pytest.mark.parametrize("entry,match", [
    (3, r"^grid\.paired\[0\] must be a paired section \(a mapping\) or null \(unpaired\), got 3$"),
    ({"radnom_init": True}, r"unknown config key paired\.radnom_init \(did you mean paired\.random_init\?\)"),
])
def test_bad_paired_entries_are_config_errors(tmp_path, entry, match):
    with pytest.raises(ConfigError, match=match):
        grid.sweep_from_dict(sweep_dict(tmp_path, grid={"paired": [entry]}))


def test_sweep_points_equal_standalone_runs(tmp_path):
    sw = grid.sweep_from_dict(sweep_dict(tmp_path / "sw"))
    summary = runsweep.run_sweep(sw, use_ray=False)
    pts = grid.expand(sw)
    for p in pts:
        alone = run_local(p.config.__class__.from_dict({**p.config.to_dict(),
                                                        "output": {**p.config.to_dict()["output"],
                                                                   "dir": str(tmp_path / ("alone-" + p.name))}}))
        got, want = (os.path.join(d, "stats") for d in (os.path.join(sw.dir, p.name), alone.run_dir))
        files = sorted(os.path.relpath(os.path.join(r, f), got) for r, _, fs in os.walk(got) for f in fs
                       if f.endswith(".npz"))
        assert len(files) == (6 if p.config.paired else 2)
        for f in files:
            with np.load(os.path.join(got, f)) as a, np.load(os.path.join(want, f)) as b:
                for k in a.files:
                    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{p.name} {f} {k}")
    assert summary is not None
