"""Helpers shared by the pipeline tests."""

from __future__ import annotations

import numpy as np

from raysens.config import load_config

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
        for k in ("mean", "var", "std", "probe_noise"):
            np.testing.assert_allclose(getattr(x, k), getattr(y, k), rtol=rtol, atol=atol, equal_nan=True,
                                       err_msg=f"layer {L} {k}")
