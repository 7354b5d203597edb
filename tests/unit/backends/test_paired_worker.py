"""Issue 29, paired runs in the worker (``backends/paired.py``, ``UnitWorker`` with ``WorkerSpec.paired``):
side b built from side a without changing side a (a scaled module, seeded random weights, another
precision), both engines on the same rows folded into one ``PairedCells`` per layer that equals two
``SensitivityEngine``s folded by hand bit for bit, and side a's part equal to an ordinary worker's.
The memory model counts both sides; a bad module name is one line. Tiny random Llama, CPU, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysens.backends import subunits
from raysens.backends.paired import PairedError
from raysens.backends.units import UnitWorker, WorkerSpec, get_tokenizer, tokenize_unit
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.memory import sizing
from raysens.core.models import load_model
from raysens.stats.paired import PairedCells

MODEL = "random:tiny-llama"
LAYERS = [1, 2]
SENS = SensitivityConfig(num_probes=2, seed=5)
TEXTS = ["The cat sat on the mat and looked around.", "Hello there", "A somewhat longer sentence with words.",
         "Short one", "Paired runs share tokens and probes."]


def spec(side_b: dict | None, **kw) -> WorkerSpec:
    return WorkerSpec(MODEL, False, "cpu", {**SENS.to_dict(), **kw}, LAYERS, 16, "fp", paired=side_b)


def side(**kw) -> dict:
    return {"model": None, "precision": None, "random_init": False, "init_seed": None, "scale": None,
            "layer_map": {}, **kw}


def unit(key: int = 0) -> dict:
    tok = get_tokenizer(MODEL, False)
    return tokenize_unit(list(range(key, key + len(TEXTS))), TEXTS, tok, 16, 2, True)


def folded(w: UnitWorker, u: dict) -> dict:
    w.fold(u)
    for _ in w._folds.wait():
        pass
    return w.acc


def by_hand(model_b, u: dict, precision: str | None = None, drop: tuple = ()) -> dict:
    """Two engines and ``PairedCells`` folded in the test: the reference (without the rows of the
    sample_ids in ``drop``)."""
    lm = load_model(MODEL)
    ea = SensitivityEngine(lm.model, SENS)
    eb = SensitivityEngine(model_b if model_b is not None else lm.model,
                           SENS if precision is None else SensitivityConfig(num_probes=2, seed=5, precision=precision))
    seqs = u["input_ids"]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = s, 1
    ra = ea.compute(ids, mask, layers=LAYERS, sample_ids=u["run_ids"], max_seq_len=16)
    rb = eb.compute(ids, mask, layers=LAYERS, sample_ids=u["run_ids"], max_seq_len=16)
    out = {}
    keep = np.array([i not in drop for i in u["run_ids"]])
    for L in LAYERS:
        out[L] = PairedCells.empty(width).update(PairedCells.check(
            np.asarray(ra.values[L])[keep], np.asarray(rb.values[L])[keep], np.asarray(ra.mask)[keep],
            np.asarray(ra.noise[L])[keep], np.asarray(rb.noise[L])[keep],
            sample_ids=[i for i in u["run_ids"] if i not in drop]))
    return out


def same(a, b) -> None:
    x, y = a.to_arrays(), b.to_arrays()
    assert sorted(x) == sorted(y)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("background", [False, True])
def test_scaled_module_pair_equals_two_engines_by_hand_and_side_a_is_untouched(background):
    shared: dict = {}
    w = UnitWorker(spec(side(scale={"module": "model.layers.1.mlp", "factor": 1.5})), shared=shared,
                   background=background)
    a_model = w._model
    before = {n: p.detach().clone() for n, p in a_model.named_parameters()}
    u = unit()
    acc = folded(w, u)
    for n, p in a_model.named_parameters():  # side a's copy is never changed
        assert torch.equal(p, before[n]), n
    b_model = w.paired.model
    assert b_model is not a_model
    for n, p in b_model.named_parameters():
        want = before[n] * 1.5 if n.startswith("layers.1.mlp.") else before[n]
        assert torch.equal(p, want), n
    ref = by_hand(b_model, u)
    for L in LAYERS:
        same(acc[L], ref[L])
        d = acc[L].differences()
        # block 1's MLP changes layer 2 (after block 1), not layer 1 (after block 0): there D = 0 exactly
        assert (np.nanmax(np.abs(d["mean_diff"])) > 0) == (L == 2)
    plain = folded(UnitWorker(spec(None), shared={}, background=background), unit())
    for L in LAYERS:  # side a of a paired run is an ordinary run of model a, bit for bit
        same(acc[L].a, plain[L])


@pytest.mark.parametrize("background", [False, True])
def test_a_sample_non_finite_on_side_b_only_is_skipped_on_both_sides(background):
    """Side b's engine reports NaN/Inf for sample 2 (``NonFiniteGradientError``, as the engine does):
    the sample is skipped ("nonfinite") on both sides, never folded into side a alone, and the state is
    the by-hand pair of the other samples, bit for bit."""
    from raysens.core.engine import NonFiniteGradientError

    w = UnitWorker(spec(side(scale={"module": "model.layers.1.mlp", "factor": 1.5})), shared={},
                   background=background)
    real = w.paired.engine.compute

    def b_compute(*args, **kw):
        res = real(*args, **kw)
        sids = [int(i) for i in kw["sample_ids"]]
        if 2 in sids:
            res.mask[sids.index(2)] = False
            raise NonFiniteGradientError([2], res)
        return res

    w.paired.engine.compute = b_compute
    u = unit()
    assert 2 in u["run_ids"]
    acc = folded(w, u)
    assert w.pending_skipped == {2: "nonfinite"} and 2 not in w.pending_computed
    ref = by_hand(w.paired.model, u, drop=(2,))
    for L in LAYERS:
        same(acc[L], ref[L])
        assert int(acc[L].a.count.max()) == int(acc[L].b.count.max()) == len(u["run_ids"]) - 1


def test_random_init_is_seeded_and_differs_from_side_a():
    u = unit()
    w1 = UnitWorker(spec(side(random_init=True, init_seed=3)), shared={}, background=False)
    w2 = UnitWorker(spec(side(random_init=True, init_seed=3)), shared={}, background=False)
    w3 = UnitWorker(spec(side(random_init=True, init_seed=4)), shared={}, background=False)
    p1, p2, p3 = (dict(w.paired.model.named_parameters()) for w in (w1, w2, w3))
    assert all(torch.equal(p1[n], p2[n]) for n in p1)
    assert not all(torch.equal(p1[n], p3[n]) for n in p1)
    assert not torch.equal(p1["layers.0.mlp.up_proj.weight"], dict(w1._model.named_parameters())["layers.0.mlp.up_proj.weight"])
    a1, a2 = folded(w1, u), folded(w2, unit())
    for L in LAYERS:
        same(a1[L], a2[L])
        same(a1[L], by_hand(w1.paired.model, u)[L])


def test_precision_variant_shares_side_a_weights():
    w = UnitWorker(spec(side(precision="bf16")), shared={}, background=False)
    assert w.paired.model is w._model and w.paired.shares_weights and w.paired.engine is not w.engine
    u = unit()
    acc = folded(w, u)
    ref = by_hand(None, u, precision="bf16")
    for L in LAYERS:
        same(acc[L], ref[L])


def test_a_bad_module_name_is_one_line():
    with pytest.raises(PairedError, match=r"^paired\.scale\.module 'model\.layers\.9\.mlp' is not a module of the "
                                          r"model; use a name such as ") as e:
        UnitWorker(spec(side(scale={"module": "model.layers.9.mlp", "factor": 2.0})), shared={})
    assert "\n" not in str(e.value)


def test_the_memory_model_counts_both_sides(monkeypatch):
    monkeypatch.setattr(sizing, "WORK_RESERVE", 0)
    monkeypatch.setattr(subunits, "process_rss", lambda: 0)
    plain = UnitWorker(spec(None, memory_budget_mb=1), shared={}, background=False)
    pair = UnitWorker(spec(side(scale={"module": "layers.0", "factor": 2.0}), memory_budget_mb=1), shared={},
                      background=False)
    p0, p1 = plain.unit_plan(16), pair.unit_plan(16)
    assert 0 <= p1.state_bytes - 3 * p0.state_bytes <= 16 * 16 * len(LAYERS)  # 2 CellStats + a DiffStats per layer (rounded up)
    assert p1.unit_bytes_per_sample > p0.unit_bytes_per_sample and p1.samples_per_unit < p0.samples_per_unit
    monkeypatch.setattr(sizing, "WORK_RESERVE", 1 << 20)  # no room for one sample: refused in one line
    pair._plans.clear()
    from raysens.store.rundir import RunError

    with pytest.raises(RunError) as e:
        pair.fold(unit(100))
    msg = str(e.value)
    assert "\n" not in msg and "does not fit the per-actor memory budget of 1 MiB (sensitivity.memory_budget_mb)" in msg
    assert "a paired run: both models and both sides' sums count against it" in msg


def test_a_causal_and_a_bidirectional_model_are_not_paired():
    with pytest.raises(PairedError, match=r"^paired run: side a \(random:tiny-llama\) is causal and side b "
                                          r"\(random:tiny-bert\) is bidirectional: their maps mask different cells"):
        UnitWorker(spec(side(model={"name": "random:tiny-bert", "trust_remote_code": False})), shared={})
