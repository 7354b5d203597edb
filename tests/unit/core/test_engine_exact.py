"""``exact`` estimator against an independent float64 ``torch.func.jacrev`` reference (docs/DESIGN.md §1).

The reference differentiates Hugging Face's own ``output_hidden_states`` path on ``inputs_embeds``
of a float64 deep copy; the engine runs float32 with hooks that stop after the target layer, so the
two share no code beyond the model itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import CAUSAL_KINDS, KINDS, N_LAYERS, minilm, random_ids, reference, rel_fro, tiny_model
from raysens.core.engine import SensitivityConfig, SensitivityEngine, Strategy

TOL = 1e-5  # relative Frobenius error of the [S, S] matrix, float32 engine vs float64 reference


def _exact(model, ids, layers, **cfg):
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact", **cfg))
    return eng.compute(torch.as_tensor(ids)[None], layers=layers)


@pytest.mark.parametrize("layer", [0, 1, -1])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_matches_jacrev(kind, layer):
    model = tiny_model(kind)
    ids = random_ids(9, seed=11)
    A, J = reference(model, ids, layer)
    r = _exact(model, ids, layer)
    absolute = layer % (N_LAYERS + 1)
    assert r.layers == (absolute,)
    got = r.values[absolute]
    assert got.shape == (1, 9, 9) and got.dtype == np.float64
    assert r.mask.all() and r.lengths.tolist() == [9]
    assert r.noise is None and r.estimator == "exact" and r.num_probes == 1
    assert rel_fro(got[0], A) <= TOL, rel_fro(got[0], A)
    # cell-wise too, not only in aggregate (small cells must be right as well)
    np.testing.assert_allclose(got[0], A, rtol=1e-4, atol=1e-8 * A.max())
    if layer != 0:  # the reference is non-trivial: off-diagonal mass exists
        off = A - np.diag(np.diag(A))
        assert off.sum() > 0.2 * A.sum()


def test_layer_index_is_hf_hidden_states_index():
    """Layer L is hidden_states[L], not L-1 or L+1: each layer's map differs from its neighbours'."""
    model = tiny_model("llama")
    ids = random_ids(7, seed=5)
    r = _exact(model, ids, [1, 2, 3])
    for L in (1, 2, 3):
        A, _ = reference(model, ids, L)
        assert rel_fro(r.values[L][0], A) <= TOL
        for other in {1, 2, 3} - {L}:
            assert rel_fro(r.values[other][0], A) > 1e-2
    # layer 0 of Llama is the embedding itself: J_ij = δ_ij·I, A = H·I exactly
    r0 = _exact(model, ids, 0)
    np.testing.assert_array_equal(r0.values[0][0], model.config.hidden_size * np.eye(7))


@pytest.mark.parametrize("kind,strategy", [(k, s) for k in KINDS for s in ("vmap", "replicate", "loop")]
                         + [(k, "manual") for k in KINDS])
def test_strategies_agree_with_reference(kind, strategy):
    model = tiny_model(kind)
    ids = random_ids(6, seed=21)
    # several layers in one call and a chunk size that does not divide S·H: chunking is exercised
    r = _exact(model, ids, [1, -1], strategy=strategy, chunk_size=7)
    assert r.strategy == strategy
    for L in (1, N_LAYERS):
        A, _ = reference(model, ids, L)
        assert rel_fro(r.values[L][0], A) <= TOL


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_strategies_agree_with_each_other(kind):
    model = tiny_model(kind)
    ids = random_ids(6, seed=21)
    vals = {s: _exact(model, ids, 2, strategy=s, chunk_size=5).values[2][0] for s in ("vmap", "replicate", "loop")}
    auto = _exact(model, ids, 2)
    assert auto.strategy == "manual"
    vals["auto"] = auto.values[2][0]
    for s, v in vals.items():
        np.testing.assert_allclose(v, vals["vmap"], rtol=1e-5, atol=1e-7 * vals["vmap"].max(), err_msg=s)


@pytest.mark.parametrize("chunk", [dict(chunk_size=1), dict(chunk_size=3), dict(chunk_size=10_000),
                                   dict(memory_budget_mb=1), dict()])
def test_chunking_does_not_change_values(chunk):
    model = tiny_model("qwen2")
    ids = random_ids(5, seed=3)
    A, _ = reference(model, ids, 2)
    for strategy in ("vmap", "replicate", "manual"):
        r = _exact(model, ids, 2, strategy=strategy, **chunk)
        assert rel_fro(r.values[2][0], A) <= TOL


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_causal_segments_give_same_numbers(kind):
    model = tiny_model(kind)
    ids = random_ids(10, seed=8)
    A, _ = reference(model, ids, -1)
    vals = {}
    strategies = ("vmap", "replicate", "manual")
    for seg in (1, 2, 3, 10, None):
        for strategy in strategies:
            r = _exact(model, ids, -1, causal_segments=seg, strategy=strategy)
            v = r.values[N_LAYERS][0]
            assert rel_fro(v, A) <= TOL, (seg, strategy)
            vals[(seg, strategy)] = v
    ref = vals[(1, "vmap")]
    for key, v in vals.items():
        np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-7 * ref.max(), err_msg=str(key))
        assert (np.triu(v, 1) == 0.0).all()


def test_non_causal_treatment_of_causal_model_is_still_exact():
    """causal=False (no segments, full backward) still matches: nothing depends on forcing zeros."""
    model = tiny_model("gpt2")
    ids = random_ids(8, seed=2)
    A, _ = reference(model, ids, 2)
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact"), causal=False)
    v = eng.compute(ids[None], layers=2).values[2][0]
    assert rel_fro(v, A) <= TOL
    assert (np.triu(v, 1) == 0.0).all()


def test_exact_on_real_minilm():
    lm = minilm()
    ids = lm.tokenizer("Sensitivity of tokens.", return_tensors="pt")["input_ids"][0][:4]
    assert len(ids) == 4
    eng = SensitivityEngine(lm.model, SensitivityConfig(estimator="exact"))
    r = eng.compute(ids[None], layers=[0, 2, -1])
    assert r.layers == (0, 2, 6)
    for L in (0, 2, 6):
        A, _ = reference(lm.model, ids, L, chunk_size=512)
        err = rel_fro(r.values[L][0], A)
        assert err <= TOL, (L, err)
    assert (np.triu(r.values[6][0], 1) > 0).any()  # an encoder: no causal zeros


def test_strategy_enum_accepted():
    cfg = SensitivityConfig(estimator="exact", strategy=Strategy.LOOP)
    assert cfg.strategy is Strategy.LOOP
