"""Out-of-memory anywhere in a unit (``raysens.core.memory.oom``): injected at the shared forward, in a chunk
and in the fold, the engine splits the unit and retries; the statistics equal an uninterrupted run
bit for bit on CPU. One sample that cannot fit fails with one line naming the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import random_ids, tiny_model
from raysens.core.memory import oom
from raysens.core.engine import SampleMemoryError, SensitivityConfig, SensitivityEngine


@pytest.fixture(autouse=True)
def _disarm():
    oom.clear()
    yield
    oom.clear()


def _batch(n=4, seq=9):
    ids = torch.stack([random_ids(seq, seed=40 + r) for r in range(n)])
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    am[n - 1, 3:] = 0
    return ids, am


def _same(a, b):
    assert a.layers == b.layers
    for L in a.layers:
        np.testing.assert_array_equal(a.values[L], b.values[L])
        if a.noise is not None:
            np.testing.assert_array_equal(a.noise[L], b.noise[L])
    np.testing.assert_array_equal(a.mask, b.mask)


CASES = [  # (model, config): each site is reached by these paths
    ("llama", dict(mode="reverse", strategy="manual", estimator="hutchinson", num_probes=2)),
    ("llama", dict(mode="reverse", strategy="vmap", estimator="hutchinson", num_probes=2)),
    ("gpt2", dict(mode="forward", strategy="auto", estimator="hutchinson", num_probes=2)),
    ("bert", dict(mode="forward", strategy="vmap", estimator="exact")),
    ("bert", dict(mode="reverse", strategy="replicate", estimator="projection")),
]


@pytest.mark.parametrize("site", oom.SITES)
@pytest.mark.parametrize("kind,cfg", CASES)
def test_injected_oom_gives_the_uninterrupted_statistics(site, kind, cfg):
    model = tiny_model(kind)
    eng = SensitivityEngine(model, SensitivityConfig(seed=3, **cfg))
    ids, am = _batch()
    want = eng.compute(ids, am, layers=[1, -1], sample_ids=[7, 3, 9, 2])
    oom.inject(site, nth=1)
    got = eng.compute(ids, am, layers=[1, -1], sample_ids=[7, 3, 9, 2])
    if site == "shared_forward" and (cfg["mode"] == "forward" and eng.strategy_used != "manual"
                                     or cfg["strategy"] == "replicate"):
        oom.clear()  # the generic forward and replicate paths have no shared forward: nothing to inject
    assert site not in oom._ARMED, "the injected error was never raised"
    _same(got, want)


@pytest.mark.parametrize("site,nth,mode,strategy", [("chunk", 3, "reverse", "manual"), ("fold", 4, "forward", "auto"),
                                                     ("shared_forward", 2, "reverse", "vmap"),
                                                     ("chunk", 5, "reverse", "vmap")])
def test_oom_after_some_sums_were_added_gives_the_same_statistics(site, nth, mode, strategy):
    """Half-way through a pass (its host rows already hold sums on CPU): they are reset and redone."""
    eng = SensitivityEngine(tiny_model("llama"), SensitivityConfig(seed=2, num_probes=3, mode=mode,
                                                                     strategy=strategy, chunk_size=2))
    ids, am = _batch()
    want = eng.compute(ids, am, layers=[1, 2, 3], sample_ids=[0, 1, 2, 3])
    oom.inject(site, nth=nth)
    got = eng.compute(ids, am, layers=[1, 2, 3], sample_ids=[0, 1, 2, 3])
    assert site not in oom._ARMED, "the injected error was never raised"
    _same(got, want)


def test_repeated_oom_splits_down_to_one_sample():
    eng = SensitivityEngine(tiny_model("llama"), SensitivityConfig(seed=1, num_probes=2, strategy="manual",
                                                                     mode="reverse", chunk_size=1))
    ids, am = _batch()
    want = eng.compute(ids, am, layers=[2], sample_ids=[1, 2, 3, 4])
    oom.inject("shared_forward", nth=1, times=2)  # [0,4) and [0,2) fail; [0,1), [1,2), [2,4) run
    got = eng.compute(ids, am, layers=[2], sample_ids=[1, 2, 3, 4])
    _same(got, want)
    assert eng.memory.pass_cap == 2  # later units start at the size that ran


def test_a_sample_that_never_fits_fails_in_one_line():
    eng = SensitivityEngine(tiny_model("llama"), SensitivityConfig(mode="reverse", strategy="manual",
                                                                     memory_budget_mb=64))
    ids, am = _batch(2)
    oom.inject("shared_forward", nth=1, times=10)
    with pytest.raises(SampleMemoryError) as exc:
        eng.compute(ids, am, layers=[-1])
    msg = str(exc.value)
    assert "\n" not in msg and "budget 64 MiB" in msg and "S=9" in msg and "max_seq_len" in msg


def test_environment_variable_arms_sites():
    oom._from_env("chunk:3, fold:2")
    assert oom._ARMED == {"chunk": [3, 1], "fold": [2, 1]}
    with pytest.raises(ValueError, match="site must be one of"):
        oom.inject("nowhere")
    oom.point("fold")
    with pytest.raises(torch.OutOfMemoryError, match="injected out of memory at fold"):
        oom.point("fold")
    oom.point("fold")  # disarmed after its one error
