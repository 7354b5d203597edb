"""The hand-written tangent paths of GPT-2 (``stacks/gpt2_tangent.py``) and BERT
(``stacks/bert_tangent.py``), docs/DESIGN.md §1.10, against independent references: exact forward
vs float64 ``torch.func.jacrev`` at every layer (random GPT-2 and BERT configs, the real MiniLM;
left- and right-padded batches), the hand-written path == the generic ``torch.func.jvp`` path
(Hutchinson, the same probes), thread-count independence (bitwise), padding invariance, the
one-off check catching a wrong tangent (the fallback to the generic path when it fails, for every
architecture: ``test_forward.py::test_fallback_when_the_manual_tangent_check_fails``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import N_LAYERS, by_thread_count, make_model, minilm, padded, random_ids, reference, rel_fro
from raysens.core.engine import SensitivityConfig, SensitivityEngine

KINDS = ("gpt2", "bert")


@pytest.fixture(scope="module")
def models():
    return {k: make_model(k, seed=3) for k in KINDS}


def _engine(model, **cfg):
    return SensitivityEngine(model, SensitivityConfig(**cfg))


def _manual(eng):
    assert eng._manual_fwd is not None, "the hand-written tangent path did not pass its check"
    return eng


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_hand_written_exact_forward_matches_jacrev_at_every_layer(models, kind, side):
    model = models[kind]
    rows = [random_ids(7, seed=31), random_ids(3, seed=32), random_ids(5, seed=33)]
    ids, am = padded(rows, side, pad=9)
    eng = _manual(_engine(model, estimator="exact", mode="forward"))
    res = eng.compute(ids, am, layers=list(range(N_LAYERS + 1)))
    assert res.mode == "forward" and res.strategy == "manual"
    for L in res.layers:
        for r, x in enumerate(rows):
            n = len(x)
            got, A = res.values[L][r, :n, :n], reference(model, x, L)[0]
            assert rel_fro(got, A) <= 1e-5, (kind, side, L, r, rel_fro(got, A))
            assert not res.values[L][r, n:].any() and not res.values[L][r, :, n:].any()


@pytest.mark.slow
def test_hand_written_exact_forward_matches_jacrev_on_minilm():
    """The real MiniLM, every layer, a left- and a right-padded batch (one engine; short sentences:
    the float64 references are the cost, ~S² each)."""
    lm = minilm()
    rows = [torch.tensor(lm.tokenizer(t)["input_ids"]) for t in ("Hi there.", "Yes")]  # 5 and 3 tokens
    n = lm.model.config.num_hidden_layers
    eng = _manual(_engine(lm.model, estimator="exact", mode="forward"))
    for side in ("left", "right"):
        ids, am = padded(rows, side)
        res = eng.compute(ids, am, layers=list(range(n + 1)))
        assert res.strategy == "manual"
        for L in res.layers:
            for r, x in enumerate(rows):
                k = len(x)
                A = reference(lm.model, x, L)[0]
                assert rel_fro(res.values[L][r, :k, :k], A) <= 1e-5, (side, L, r)


@pytest.mark.parametrize("kind", KINDS)
def test_hand_written_equals_generic(models, kind):
    """Hutchinson K=2 with the same probes: the hand-written path (GPT-2: several causal suffix
    segments) and ``torch.func.jvp`` + ``vmap`` agree to float32 rounding."""
    model = models[kind]
    ids, am = padded([random_ids(9, seed=1), random_ids(6, seed=2), random_ids(8, seed=3)], "left")
    cfg = dict(estimator="hutchinson", num_probes=2, seed=3, mode="forward")
    man, gen = _manual(_engine(model, **cfg)), _engine(model, strategy="vmap", **cfg)
    layers = list(range(N_LAYERS + 1))
    a, b = man.compute(ids, am, layers=layers), gen.compute(ids, am, layers=layers)
    assert a.strategy == "manual" and b.strategy == "vmap"
    assert (len(man._manual_fwd.segments(9)) > 1) == (kind == "gpt2")
    for L in layers:
        np.testing.assert_allclose(a.values[L], b.values[L], rtol=1e-4, atol=1e-7 * b.values[L].max())
        np.testing.assert_allclose(a.noise[L], b.noise[L], rtol=1e-3, atol=1e-7 * b.noise[L].max())


@pytest.mark.parametrize("kind", [*KINDS, "minilm"])
def test_hand_written_numbers_do_not_depend_on_the_thread_count(models, kind):
    model = minilm().model if kind == "minilm" else models[kind]
    ids, am = padded([random_ids(5, seed=1), random_ids(3, seed=2), random_ids(1, seed=4)], "right")
    eng = _manual(_engine(model, estimator="hutchinson", num_probes=2, mode="forward"))
    out = by_thread_count(eng, ids, am, [0, 1, -1])
    for L in out[1].layers:
        np.testing.assert_array_equal(out[1].values[L], out[2].values[L])
        np.testing.assert_array_equal(out[1].noise[L], out[2].noise[L])


@pytest.mark.parametrize("kind", KINDS)
def test_hand_written_sample_independent_of_batch_and_padding(models, kind):
    model = models[kind]
    x = random_ids(6, seed=21)
    cfg = dict(estimator="hutchinson", num_probes=3, mode="forward", seed=5)
    alone = _manual(_engine(model, **cfg)).compute(x[None], layers=[1, -1], sample_ids=[9])
    for side in ("left", "right"):
        ids, am = padded([random_ids(3, seed=1), x, random_ids(8, seed=2)], side, pad=7)
        r = _engine(model, **cfg).compute(ids, am, layers=[1, -1], sample_ids=[1, 9, 2])
        assert r.strategy == "manual"
        for L in alone.layers:
            np.testing.assert_allclose(r.values[L][1, :6, :6], alone.values[L][0], rtol=1e-5,
                                       atol=1e-7 * alone.values[L].max())


@pytest.mark.parametrize("kind", KINDS)
def test_the_check_catches_a_wrong_tangent(models, kind, monkeypatch):
    """A tangent path off by a small amount at one layer fails the one-off check (so the engine
    falls back to the generic path)."""
    from raysens.core.passes import forward

    eng = _manual(_engine(models[kind], estimator="exact", mode="forward"))
    stack = eng._manual
    name = "jvp_packed" if eng.causal and stack.packs else "jvp"  # what the check calls (packed causal stacks)
    good = getattr(type(stack), name)

    def off(self, *args):
        out = good(self, *args)
        if N_LAYERS in out:
            out[N_LAYERS] = out[N_LAYERS] * 1.001
        return out

    monkeypatch.setattr(type(stack), name, off)
    path = forward.ManualForward(stack, eng.causal, eng.memory, eng._frows, 2.0)
    assert "relative error" in path.check(eng._autograd.forward)
    assert _engine(models[kind], estimator="exact", mode="forward")._manual_fwd is None


