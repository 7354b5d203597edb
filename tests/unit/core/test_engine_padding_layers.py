"""Causal zeros, padding invariance, truncation, several layers per forward, and input errors."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from refs import CAUSAL_KINDS, N_LAYERS, VOCAB, padded, random_ids, reference, rel_fro, tiny_model
from raysens.core.engine import (
    Estimator,
    NonFiniteGradientError,
    ProbeDistribution,
    SensitivityConfig,
    SensitivityEngine,
    Strategy,
    is_causal_model,
)


def _engine(model, **cfg):
    return SensitivityEngine(model, SensitivityConfig(**cfg))


# ---------------------------------------------------------------------------------------- causal
@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_causal_models_have_exact_zeros_above_diagonal(kind):
    model = tiny_model(kind)
    assert is_causal_model(model)
    ids = random_ids(8, seed=4)[None]
    runs = [("exact", s, c) for s in ("vmap", "replicate", "loop") for c in (None, False)]
    runs += [(e, s, c) for e in ("hutchinson", "projection") for s in ("vmap", "replicate") for c in (None, False)]
    for est, strategy, causal in runs:  # causal=False: no prefix segments, the zeros must come from the model
        eng = SensitivityEngine(model, SensitivityConfig(estimator=est, strategy=strategy, num_probes=2,
                                                         chunk_size=64), causal=causal)
        r = eng.compute(ids, layers=[1, -1])
        for L in r.layers:
            v = r.values[L][0]
            assert (v[np.triu_indices(8, 1)] == 0.0).all(), (est, strategy, causal, L)
            assert (v[np.tril_indices(8)] > 0).all(), (est, strategy, causal, L)
            if r.noise is not None:
                assert (r.noise[L][0][np.triu_indices(8, 1)] == 0.0).all()


def test_bert_is_not_causal():
    model = tiny_model("bert")
    assert not is_causal_model(model)
    r = _engine(model, estimator="exact").compute(random_ids(7, seed=4)[None], layers=[1, -1])
    for L in r.layers:
        assert (r.values[L][0] > 0).all()  # every cell, both triangles


def test_encoder_decoder_analyses_its_encoder():
    """A seq2seq model is analysed through its encoder (docs/DESIGN.md §1.1): the same numbers as
    its encoder module passed alone."""
    import transformers as tf

    cfg = tf.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    model = tf.T5Model(cfg).eval()
    conf = SensitivityConfig(estimator="exact", mode="reverse")
    ids = torch.tensor([[5, 6, 7, 8]])
    got = SensitivityEngine(model, conf).compute(ids, layers=-1).values[1]
    want = SensitivityEngine(model.get_encoder(), conf).compute(ids, layers=-1).values[1]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.sum() > 0


@functools.lru_cache(maxsize=None)
def _smollm2():
    from raysens.core.models import load_model

    return load_model("smollm2")


def test_smollm2_real_causal_zeros():
    lm = _smollm2()
    ids = lm.tokenizer("The cat sat on the mat.", return_tensors="pt")["input_ids"][:, :6]
    assert ids.shape == (1, 6)
    for causal in (None, False):
        for est in ("hutchinson", "projection"):
            eng = SensitivityEngine(lm.model, SensitivityConfig(estimator=est, num_probes=2), causal=causal)
            assert eng.causal == (causal is None)
            r = eng.compute(ids, layers=[1, 3])
            for L in (1, 3):
                v = r.values[L][0]
                assert np.isfinite(v).all()
                assert (v[np.triu_indices(6, 1)] == 0.0).all(), (causal, est, L)
                assert (v[np.tril_indices(6)] > 0).all(), (causal, est, L)


# ---------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_padding_side_and_batch_do_not_change_a_sample(kind, estimator):
    model = tiny_model(kind)
    x, y, z = random_ids(6, seed=41), random_ids(4, seed=42), random_ids(8, seed=43)
    cfg = dict(estimator=estimator, num_probes=2, seed=9)
    alone = _engine(model, **cfg).compute(x[None], layers=[1, -1], sample_ids=[2])
    if estimator == "exact":
        for L in (1, N_LAYERS):
            assert rel_fro(alone.values[L][0], reference(model, x, L)[0]) <= 1e-5
    for side in ("right", "left"):
        for pad_token in (0, 57):  # the pad token's identity must not matter
            ids, am = padded([z, x, y], side, pad_token)
            r = _engine(model, **cfg).compute(ids, am, layers=[1, -1], sample_ids=[1, 2, 3])
            assert r.lengths.tolist() == [8, 6, 4]
            assert r.values[N_LAYERS].shape == (3, 8, 8)
            for row, n in enumerate((8, 6, 4)):
                inside = np.zeros((8, 8), bool)
                inside[:n, :n] = True
                np.testing.assert_array_equal(r.mask[row], inside)
            for L in (1, N_LAYERS):
                ref = alone.values[L][0]
                np.testing.assert_allclose(r.values[L][1, :6, :6], ref, rtol=1e-5, atol=1e-7 * ref.max(),
                                           err_msg=f"{side} {pad_token} {L}")
                if estimator == "hutchinson":
                    np.testing.assert_allclose(r.noise[L][1, :6, :6], alone.noise[L][0], rtol=1e-4,
                                               atol=1e-7 * alone.noise[L].max())
    # without the attention mask, BERT's padding tokens are real tokens: the sample changes
    if kind == "bert" and estimator == "exact":
        ids, _ = padded([z, x, y], "right", 57)
        r = _engine(model, **cfg).compute(ids, layers=-1, sample_ids=[1, 2, 3])
        assert rel_fro(r.values[N_LAYERS][1, :6, :6], alone.values[N_LAYERS][0]) > 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_one_token_sample(kind):
    model = tiny_model(kind)
    x, y = random_ids(1, seed=3), random_ids(5, seed=4)
    A, _ = reference(model, x, -1)
    eng = _engine(model, estimator="exact")
    alone = eng.compute(x[None], layers=-1)
    assert alone.values[N_LAYERS].shape == (1, 1, 1)
    assert rel_fro(alone.values[N_LAYERS][0], A) <= 1e-5
    ids, am = padded([y, x], "left", 0)
    r = eng.compute(ids, am, layers=-1)
    assert r.lengths.tolist() == [5, 1] and r.mask[1].sum() == 1
    np.testing.assert_allclose(r.values[N_LAYERS][1, :1, :1], alone.values[N_LAYERS][0], rtol=1e-5)


def test_attention_mask_accepts_arrays_lists_and_bools():
    model = tiny_model("llama")
    x, y = random_ids(5, seed=1), random_ids(3, seed=2)
    ids, am = padded([x, y], "left", 0)
    a = _engine(model, estimator="exact").compute(ids, am, layers=2)
    b = _engine(model, estimator="exact").compute(ids.tolist(), am.bool().numpy(), layers=2)
    np.testing.assert_array_equal(a.values[2], b.values[2])
    np.testing.assert_array_equal(a.mask, b.mask)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_max_seq_len_equals_truncated_ids(kind):
    model = tiny_model(kind)
    x, y = random_ids(9, seed=5), random_ids(3, seed=6)
    eng = _engine(model, estimator="exact")
    r = eng.compute(x[None], layers=[1, -1], max_seq_len=5)
    t = eng.compute(x[None, :5], layers=[1, -1])
    assert r.lengths.tolist() == [5] and r.values[1].shape == (1, 5, 5)
    for L in r.layers:
        np.testing.assert_allclose(r.values[L], t.values[L], rtol=1e-6, atol=1e-9 * t.values[L].max())
    assert rel_fro(r.values[N_LAYERS][0], reference(model, x[:5], -1)[0]) <= 1e-5
    # left-padded batch: the first max_seq_len *real* tokens are kept, shorter rows are untouched
    ids, am = padded([x, y], "left", 0)
    rb = eng.compute(ids, am, layers=[1, -1], max_seq_len=5)
    assert rb.lengths.tolist() == [5, 3]
    ry = eng.compute(y[None], layers=[1, -1])
    for L in rb.layers:
        np.testing.assert_allclose(rb.values[L][0], t.values[L][0], rtol=1e-5, atol=1e-7 * t.values[L].max())
        np.testing.assert_allclose(rb.values[L][1, :3, :3], ry.values[L][0], rtol=1e-5,
                                   atol=1e-7 * ry.values[L].max())
    # max_seq_len larger than every sample changes nothing
    big = eng.compute(x[None], layers=1, max_seq_len=100)
    np.testing.assert_array_equal(big.values[1], eng.compute(x[None], layers=1).values[1])


# ---------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("strategy", ["vmap", "replicate", "loop"])
@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_several_layers_equal_one_at_a_time(estimator, strategy):
    model = tiny_model("qwen2")
    ids, am = padded([random_ids(6, seed=7), random_ids(4, seed=8)], "right", 0)
    cfg = dict(estimator=estimator, strategy=strategy, num_probes=2, chunk_size=24, mode="reverse")  # reverse strategies
    both = _engine(model, **cfg).compute(ids, am, layers=[-1, 0, 2, 1, 3], sample_ids=[4, 5])
    assert both.layers == (0, 1, 2, 3)
    assert both.strategy == strategy
    for L in both.layers:
        one = _engine(model, **cfg).compute(ids, am, layers=L, sample_ids=[4, 5])
        assert one.layers == (L,)
        np.testing.assert_allclose(both.values[L], one.values[L], rtol=1e-6, atol=1e-9 * one.values[L].max(),
                                   err_msg=str(L))
        if estimator == "hutchinson":
            np.testing.assert_allclose(both.noise[L], one.noise[L], rtol=1e-5, atol=1e-9 * one.noise[L].max())
    # the layers really differ from each other
    assert rel_fro(both.values[1], both.values[3]) > 1e-2


@pytest.mark.parametrize("strategy", ["vmap", "manual"])
def test_blocks_after_target_layer_and_lm_head_are_not_run(strategy):
    model = copy.deepcopy(tiny_model("llama"))
    eng = _engine(model, estimator="projection", strategy=strategy)  # its one-off checks run the model
    calls = {}
    # the MLP's last projection runs in both strategies (manual calls the block's modules, not the block)
    hooks = [blk.mlp.down_proj.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
             for i, blk in enumerate(eng.model.model.layers)]  # the engine's own modules
    hooks.append(eng.model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", 1)))
    eng.compute(random_ids(5, seed=1)[None], layers=[0, 2])
    assert eng.strategy_used == strategy
    assert set(calls) == {0, 1}  # hidden_states[2] is the output of blocks 0 and 1
    calls.clear()
    eng.compute(random_ids(5, seed=1)[None], layers=-1)
    assert set(calls) == {0, 1, 2}
    for h in hooks:
        h.remove()


# ---------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def eng():
    return _engine(tiny_model("gpt2"), estimator="projection")


@pytest.mark.parametrize("layers, msg", [(4, "out of range"), (-5, "out of range"), ([1, 7], "out of range"),
                                         (1.5, "must be an int"), (True, "must be an int"),
                                         ("1", "must be an int"), ([], "empty")])
def test_bad_layer_index(eng, layers, msg):
    with pytest.raises(ValueError, match=msg) as ei:
        eng.compute(random_ids(4, seed=1)[None], layers=layers)
    if msg == "out of range":
        assert "0..3" in str(ei.value)


def test_layer_bounds_inclusive(eng):
    assert eng.resolve_layers([0, 3, -1, -4]) == (0, 3)


@pytest.mark.parametrize("max_seq_len", [0, -1, False])
def test_bad_max_seq_len(eng, max_seq_len):
    with pytest.raises(ValueError, match="max_seq_len must be >= 1"):
        eng.compute(random_ids(4, seed=1)[None], max_seq_len=max_seq_len)


def test_bad_inputs(eng):
    ids = random_ids(4, seed=1)[None].repeat(2, 1)
    with pytest.raises(ValueError, match=r"batch rows \[1\] have no tokens"):
        eng.compute(ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="no tokens"):
        eng.compute(torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 3\) != input_ids \(2, 4\)"):
        eng.compute(ids, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"must be \[batch, seq\]"):
        eng.compute(ids[0])
    with pytest.raises(ValueError, match="empty batch"):
        eng.compute(torch.zeros((0, 4), dtype=torch.long))
    with pytest.raises(ValueError, match="sample_ids has shape"):
        eng.compute(ids, sample_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        eng.compute(ids, sample_ids=[1, -2])


def test_config_errors_and_round_trip():
    with pytest.raises(ValueError, match=r"unknown keys \['estimatr'\]"):
        SensitivityConfig.from_dict({"estimatr": "exact"})
    for key, bad in [("estimator", "jacobian"), ("strategy", "threads"), ("probe_distribution", "uniform")]:
        with pytest.raises(ValueError, match=f"unknown {key} '{bad}'"):
            SensitivityConfig(**{key: bad})
    for key in ("num_probes", "chunk_size", "memory_budget_mb", "causal_segments"):
        with pytest.raises(ValueError, match=f"{key} must be >= 1"):
            SensitivityConfig(**{key: 0})
    cfg = SensitivityConfig(estimator="exact", strategy="loop", probe_distribution="sphere", num_probes=3,
                            chunk_size=4, causal_segments=2, seed=7, memory_budget_mb=10)
    assert cfg.estimator is Estimator.EXACT and cfg.strategy is Strategy.LOOP
    assert cfg.probe_distribution is ProbeDistribution.SPHERE
    d = cfg.to_dict()
    assert d["estimator"] == "exact" and d["strategy"] == "loop"
    assert SensitivityConfig.from_dict(d) == cfg
    default = SensitivityConfig()
    assert default.estimator is Estimator.HUTCHINSON and default.strategy is Strategy.AUTO


def _ids_without(token, n, seed):
    t = random_ids(n, seed=seed)
    t[t == token] = token + 1
    return t


def test_nan_in_gradients_names_the_samples():
    model = copy.deepcopy(tiny_model("llama"))
    bad_token = 7
    with torch.no_grad():
        model.get_input_embeddings().weight[bad_token] = float("nan")
    rows = [_ids_without(bad_token, 6, s) for s in (1, 2, 3, 4)]
    rows[1][3] = bad_token
    rows[3][0] = bad_token
    ids = torch.stack(rows)
    eng = _engine(model, estimator="exact")
    with pytest.raises(NonFiniteGradientError, match=r"sample_ids \[21, 23\]") as ei:
        eng.compute(ids, layers=[1, -1], sample_ids=[20, 21, 22, 23])
    err = ei.value
    assert err.sample_ids == [21, 23]
    part = err.partial
    assert not part.mask[[1, 3]].any() and part.mask[[0, 2]].all()
    good = _engine(tiny_model("llama"), estimator="exact").compute(ids[[0, 2]], layers=[1, -1])
    for L in part.layers:  # nothing computed for the good samples is lost
        np.testing.assert_allclose(part.values[L][[0, 2]], good.values[L], rtol=1e-6)


def test_inf_in_gradients_raises():
    model = copy.deepcopy(tiny_model("llama"))
    with torch.no_grad():
        model.model.norm.weight.mul_(1e30)  # finite forward, ‖J‖² overflows float32
    with pytest.raises(NonFiniteGradientError) as ei:
        _engine(model, estimator="exact").compute(random_ids(4, seed=1)[None], layers=-1, sample_ids=[5])
    assert ei.value.sample_ids == [5]
    assert np.isinf(ei.value.partial.values[N_LAYERS]).any()
