"""Helpers shared by the pipeline tests."""

from __future__ import annotations

import numpy as np

from raysens.config import load_config

KEEP = "--output.compact_every=0"  # keep every partial (tests that look at partials themselves)
PER_UNIT = "--cluster.ship_every_units=1"  # one partial per unit (tests that delete / corrupt a unit's partial)
FAST = ["--data.max_seq_len=10", "--layers=[1,-1]", "--output.plots=false", "--output.progress_every_s=0"]


def config(model: str, out, *extra: str, **kw):
    """A small run config: the tiny model, the bundled corpus, S<=10, two layers."""
    args = [f"--model.name={model}", f"--output.dir={out}", *FAST, *extra]
    args += [f"--{k.replace('__', '.')}={v}" for k, v in kw.items()]
    return load_config(None, args)


def assert_same_stats(a, b, rtol=0.0, atol=0.0):
    """Two loaded runs have the same layers, counts and statistics (exactly, or within rtol)."""
    assert sorted(a.layers) == sorted(b.layers)
    for L in a.layers:
        x, y = a[L], b[L]
        assert x.count == y.count
        np.testing.assert_array_equal(x.cell_count, y.cell_count)
        for k in ("mean", "var", "std", "probe_noise", "sum"):
            np.testing.assert_allclose(getattr(x, k), getattr(y, k), rtol=rtol, atol=atol, equal_nan=True,
                                       err_msg=f"layer {L} {k}")
        # what drives a cell (docs/DESIGN.md §2.1-2.2): extremes, their sample_ids and the histogram
        # quantiles do not depend on the merge grouping at all: bit for bit, whatever rtol says
        for k in EXACT:
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k), err_msg=f"layer {L} {k}")
        xa, ya = x.state.to_arrays(), y.state.to_arrays()
        for k in STATE_EXACT:  # the compact state itself (issue 18): exact integer sums and histogram
            np.testing.assert_array_equal(xa[k], ya[k], err_msg=f"layer {L} state {k}")


STATE_EXACT = ("count", "max_id", "row_max_id", "min", "s1_top", "s1_limbs", "s2_top", "s2_limbs", "hist_counts",
               "hist_start", "hist_level", "hist_end")
EXACT = ("max", "max_sample_id", "min", "row_max", "row_max_sample_id", "q25", "median", "q75")


def stats_files(run_dir) -> dict:
    """``{file name: {member: array}}`` of a run directory's ``stats/*.npz`` (to compare two runs bit for bit)."""
    import os

    out = {}
    for f in sorted(os.listdir(os.path.join(run_dir, "stats"))):
        if f.endswith(".npz"):
            with np.load(os.path.join(run_dir, "stats", f)) as z:
                out[f] = {k: z[k] for k in z.files}
    return out
