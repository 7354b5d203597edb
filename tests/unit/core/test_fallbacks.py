"""The fallback chain for operators ``torch.func`` cannot batch (docs/DESIGN.md §1.4, §1.10), chosen by
a capability check or the exception type, never by the error's text (issue 28).

A tiny GPT-2 gets an identity operator after the first block's MLP activation that torch cannot
batch: its backward reads a number (``.item()``: "Batching rule not implemented for aten::item",
a plain ``RuntimeError``), or it has a forward derivative but no ``vmap`` rule. The engine must

- pick ``loop`` once at construction (``transforms.pick_reverse`` / ``pick_forward``), and
- when that check is bypassed (an operator only a real input reaches), move ``auto`` / forward
  ``vmap`` to ``loop`` at run time, because the loop runs where the batched path raised;

and give the numbers of an engine configured with ``loop`` bit for bit, within 1e-5 of a float64
``jacrev`` of the unmodified model. An error the loop raises too, and an out-of-memory error, are
not taken for a missing batching rule: they go up and the strategy stays.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from refs import make_model, padded, random_ids, reference, rel_fro
from raysens.core import engine as engine_mod
from raysens.core.engine import SampleMemoryError, SensitivityConfig, SensitivityEngine
from raysens.core.options import Strategy
from raysens.core.passes.transforms import ForwardTransform


class _ReadsANumber(torch.autograd.Function):
    """Identity whose backward calls ``.item()`` (no batching rule: the batched backward raises)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g.sum().item()
        return g


class _NoVmapRule(torch.autograd.Function):
    """Identity with a forward derivative and a backward but no ``vmap`` rule."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def jvp(ctx, t):
        return t.clone()


class _Planted(torch.autograd.Function):
    """Identity whose backward raises ``error`` when armed (batched or not)."""

    error: BaseException | None = None

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if _Planted.error is not None:
            raise _Planted.error
        return g


class _After(torch.nn.Module):
    def __init__(self, inner, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, x):
        return self.fn.apply(self.inner(x))


@pytest.fixture(scope="module")
def plain():
    return make_model("gpt2")


def _with(model, fn):
    m = copy.deepcopy(model)
    m.transformer.h[0].mlp.act = _After(m.transformer.h[0].mlp.act, fn)
    return m


def _batch():
    return padded([random_ids(6, seed=21), random_ids(4, seed=22)], "right")


@pytest.fixture
def generic(monkeypatch):
    """No hand-written stack (the identity would pass its check): the autograd paths run."""
    monkeypatch.setattr(engine_mod, "unsupported_reason", lambda model: "the test runs the generic paths")


def _engine(model, **cfg):
    return SensitivityEngine(model, SensitivityConfig(estimator="exact", chunk_size=3, **cfg))


def _check_against_loop_and_jacrev(got, model, plain, ids, am, **cfg):
    want = _engine(model, strategy="loop", **cfg).compute(ids, am, layers=[1, 3])
    for L in (1, 3):
        assert got.values[L].tobytes() == want.values[L].tobytes(), L
        for r, n in enumerate(am.sum(1).tolist()):
            ref, _ = reference(plain, ids[r, :n], L)
            assert rel_fro(got.values[L][r, :n, :n], ref) <= 1e-5, (L, r)


@pytest.mark.usefixtures("generic")
def test_reverse_without_a_batching_rule_picks_loop_at_construction(plain):
    model = _with(plain, _ReadsANumber)
    eng = _engine(model, mode="reverse")
    assert eng._autograd.strategy is Strategy.LOOP  # the one-off capability check (transforms.pick_reverse)
    ids, am = _batch()
    res = eng.compute(ids, am, layers=[1, 3])
    assert res.strategy == "loop"
    _check_against_loop_and_jacrev(res, model, plain, ids, am, mode="reverse")


@pytest.mark.usefixtures("generic")
def test_reverse_auto_moves_to_loop_at_run_time(plain, monkeypatch):
    monkeypatch.setattr(engine_mod, "pick_reverse", lambda *a, **k: (True, ""))  # the check did not see the op
    model = _with(plain, _ReadsANumber)
    eng = _engine(model, mode="reverse")
    assert eng._autograd.strategy is Strategy.AUTO
    ids, am = _batch()
    res = eng.compute(ids, am, layers=[1, 3])
    assert res.strategy == "loop" and eng._autograd.strategy is Strategy.LOOP
    _check_against_loop_and_jacrev(res, model, plain, ids, am, mode="reverse")


@pytest.mark.usefixtures("generic")
def test_explicit_vmap_is_not_degraded(plain, monkeypatch):
    eng = _engine(_with(plain, _ReadsANumber), mode="reverse", strategy="vmap")
    with pytest.raises(RuntimeError):
        eng.compute(*_batch(), layers=[1])
    assert eng._autograd.strategy is Strategy.VMAP


@pytest.mark.usefixtures("generic")
@pytest.mark.parametrize("error,raised", [(RuntimeError("planted: not a batching rule"), RuntimeError),
                                          (torch.OutOfMemoryError("planted out of memory"), SampleMemoryError)])
def test_an_error_the_loop_raises_too_goes_up_and_auto_stays(plain, monkeypatch, error, raised):
    model = _with(plain, _Planted)
    eng = _engine(model, mode="reverse")
    assert eng._autograd.strategy is Strategy.AUTO
    monkeypatch.setattr(_Planted, "error", error)
    with pytest.raises(raised, match="planted"):
        eng.compute(*_batch(), layers=[1])
    assert eng._autograd.strategy is Strategy.AUTO


@pytest.mark.usefixtures("generic")
def test_forward_without_a_vmap_rule_picks_loop_at_construction(plain):
    model = _with(plain, _NoVmapRule)
    eng = _engine(model, mode="forward")
    assert eng._generic_fwd.strategy is ForwardTransform.LOOP  # transforms.pick_forward
    ids, am = _batch()
    res = eng.compute(ids, am, layers=[1, 3])
    assert res.strategy == "loop" and res.mode == "forward"
    _check_against_loop_and_jacrev(res, model, plain, ids, am, mode="forward")


@pytest.mark.usefixtures("generic")
def test_forward_vmap_moves_to_loop_at_run_time(plain, monkeypatch):
    monkeypatch.setattr(engine_mod, "pick_forward", lambda forward, model, n, first, **k: first)
    model = _with(plain, _NoVmapRule)
    eng = _engine(model, mode="forward")
    assert eng._generic_fwd.strategy is ForwardTransform.VMAP
    ids, am = _batch()
    res = eng.compute(ids, am, layers=[1, 3])
    assert res.strategy == "loop" and eng._generic_fwd.strategy is ForwardTransform.LOOP
    _check_against_loop_and_jacrev(res, model, plain, ids, am, mode="forward")
    assert np.isfinite(res.values[3]).all()
