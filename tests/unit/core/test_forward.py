"""Forward mode (docs/DESIGN.md §1.10) against independent references: exact forward vs float64
``torch.func.jacrev`` at every layer (random Llama/GQA, Qwen2, Mistral, GPT-2, BERT, the real
MiniLM; left- and right-padded batches), exact forward == exact reverse, Hutchinson forward unbiased
with calibrated standard errors, the forward/reverse cost model, thread-count independence, memory
knobs that do not change numbers, NaN/Inf reporting, and the mode recorded in the result."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from refs import N_LAYERS, make_model, minilm, padded, random_ids, reference, rel_fro, tiny_model
from raysens.core.engine import Mode, NonFiniteGradientError, SensitivityConfig, SensitivityEngine
from raysens.core.passes.probes import draw_forward_probes, draw_probes, position_seed, probe_seed
from raysens.core.passes.schedule import mode_costs, pick_mode

FORWARD_KINDS = ("llama", "qwen2", "mistral", "gpt2", "bert")


@pytest.fixture(scope="module")
def models():
    return {k: make_model(k) for k in FORWARD_KINDS}


def _engine(model, **cfg):
    return SensitivityEngine(model, SensitivityConfig(**cfg))


@pytest.mark.parametrize("fusion", ["eager", "compile"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", FORWARD_KINDS)
def test_exact_forward_matches_jacrev_at_every_layer(models, kind, side, fusion):
    model = models[kind]
    rows = [random_ids(6, seed=11), random_ids(4, seed=12)]
    ids, am = padded(rows, side)
    eng = _engine(model, estimator="exact", mode="forward", fusion=fusion)
    res = eng.compute(ids, am, layers=list(range(N_LAYERS + 1)))
    assert res.mode == "forward" and res.layers == tuple(range(N_LAYERS + 1))
    assert res.strategy == "manual" and eng.fusion_used == fusion  # the hand-written path, with these kernels
    for L in res.layers:
        for r, x in enumerate(rows):
            n = len(x)
            A, _ = reference(model, x, L)
            got = res.values[L][r, :n, :n]
            assert rel_fro(got, A) <= 1e-5, (kind, side, L, r, rel_fro(got, A))
            assert res.mask[r, :n, :n].all() and not res.mask[r, n:].any()


def test_exact_forward_matches_jacrev_on_minilm():
    lm = minilm()
    ids = torch.tensor(lm.tokenizer("Forward mode pushes tangents.")["input_ids"])
    n = lm.model.config.num_hidden_layers
    res = _engine(lm.model, estimator="exact", mode="forward").compute(ids[None], layers=[0, 3, n])
    for L in res.layers:
        A, _ = reference(lm.model, ids, L)
        assert rel_fro(res.values[L][0], A) <= 1e-5, L


@pytest.mark.parametrize("kind", FORWARD_KINDS)
def test_exact_forward_equals_exact_reverse(models, kind):
    model = models[kind]
    ids, am = padded([random_ids(7, seed=5), random_ids(5, seed=6), random_ids(3, seed=7)], "right")
    layers = list(range(N_LAYERS + 1))
    f = _engine(model, estimator="exact", mode="forward").compute(ids, am, layers=layers)
    r = _engine(model, estimator="exact", mode="reverse").compute(ids, am, layers=layers)
    assert f.mode == "forward" and r.mode == "reverse"
    np.testing.assert_array_equal(f.mask, r.mask)
    for L in layers:
        v = f.mask
        assert rel_fro(f.values[L][v], r.values[L][v]) <= 1e-5, L


def _replicates(model, x, layers, k, n=120, seed=0):
    """n independent forward-mode estimates of one sample (distinct sample_ids → distinct probes)."""
    eng = _engine(model, estimator="hutchinson", num_probes=k, mode="forward", seed=seed)
    return eng.compute(x[None].repeat(n, 1), layers=layers, sample_ids=list(range(1000, 1000 + n)))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_hutchinson_forward_is_unbiased(models, kind):
    """The mean of K=1 estimates over many probe draws converges to exact within its standard
    error (z of the mean over cells: mean ≈ 0, variance ≈ 1)."""
    model = models[kind]
    x = random_ids(5, seed=3)
    layers = [1, N_LAYERS]
    exact = _engine(model, estimator="exact", mode="forward").compute(x[None], layers=layers)
    res = _replicates(model, x, layers, k=1, n=200)
    for L in layers:
        v, A = res.values[L], exact.values[L][0]
        keep = A > 1e-6 * A.max()
        z = (v.mean(0) - A)[keep] / (v.std(0, ddof=1)[keep] / np.sqrt(len(v)))
        assert np.abs(z).max() < 4.5, (L, np.abs(z).max())
        assert abs(z.mean()) < 0.6 and 0.3 < z.var() < 2.0, (L, z.mean(), z.var())


def test_standard_errors_are_calibrated():
    """K=4: the reported per-sample noise σ²/K matches the variance of Â across probe draws (mean
    ratio ≈ 1), and z = (Â − A)/√(mean noise) has mean ≈ 0 and variance ≈ 1."""
    model = tiny_model("llama")
    x = random_ids(6, seed=8)
    A = _engine(model, estimator="exact", mode="forward").compute(x[None], layers=-1).values[N_LAYERS][0]
    r = _replicates(model, x, [N_LAYERS], k=4, n=200)
    v, noise = r.values[N_LAYERS], r.noise[N_LAYERS]
    keep = A > 1e-6 * A.max()
    ratio = v.var(0, ddof=1)[keep] / noise.mean(0)[keep]
    assert 0.85 <= ratio.mean() <= 1.15, ratio.mean()
    z = (v - A)[:, keep] / np.sqrt(noise.mean(0)[keep])
    assert abs(z.mean()) < 0.1 and 0.85 < z.var() < 1.15, (z.mean(), z.var())
    cover = (np.abs(v - A) <= 2 * r.stderr(N_LAYERS))[:, keep].mean()
    assert 0.80 <= cover <= 0.97, cover  # per-sample K=4 standard errors: t-like, skewed (see reverse test)


def test_forward_probes_depend_only_on_seed_sample_and_position():
    a = draw_forward_probes(SensitivityConfig().probe_distribution, 3, 17, 6, 2, 8)
    b = draw_forward_probes(SensitivityConfig().probe_distribution, 3, 17, 4, 2, 8)
    assert torch.equal(a[:4], b)  # a longer sample shares its prefix's probes
    assert not torch.equal(a, draw_forward_probes(SensitivityConfig().probe_distribution, 4, 17, 6, 2, 8))
    assert position_seed(3, 17, 2) != probe_seed(3, 17, 2)
    assert position_seed(2**40, 17, 2) != position_seed(0, 17, 2)
    assert probe_seed(0, 1, 2) == probe_seed(0, 1, 2)  # the reverse seeds are unchanged
    assert not torch.equal(draw_probes(SensitivityConfig().probe_distribution, 3, 17, 2, 1, 2, 8)[0], a[0])


def test_sample_result_independent_of_batch_and_padding():
    model = tiny_model("llama")
    x = random_ids(6, seed=21)
    cfg = dict(estimator="hutchinson", num_probes=3, mode="forward", seed=5)
    alone = _engine(model, **cfg).compute(x[None], layers=[1, -1], sample_ids=[9])
    for side in ("left", "right"):
        ids, am = padded([random_ids(3, seed=1), x, random_ids(8, seed=2)], side, pad=7)
        r = _engine(model, **cfg).compute(ids, am, layers=[1, -1], sample_ids=[1, 9, 2])
        for L in alone.layers:
            np.testing.assert_allclose(r.values[L][1, :6, :6], alone.values[L][0], rtol=1e-5,
                                       atol=1e-7 * alone.values[L].max())


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_numbers_do_not_depend_on_the_thread_count(kind):
    model = tiny_model(kind)
    ids, am = padded([random_ids(5, seed=1), random_ids(3, seed=2)], "right")
    eng = _engine(model, estimator="hutchinson", num_probes=2, mode="forward")
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = eng.compute(ids, am, layers=[1, -1])
    finally:
        torch.set_num_threads(before)
    for L in out[1].layers:
        np.testing.assert_array_equal(out[1].values[L], out[2].values[L])


def test_chunk_size_and_budget_do_not_change_numbers():
    model = tiny_model("gpt2")
    x = random_ids(6, seed=4)[None]
    cfg = dict(estimator="hutchinson", num_probes=2, mode="forward")
    base = _engine(model, **cfg).compute(x, layers=[1, -1])
    for kw in ({"chunk_size": 1}, {"chunk_size": 5}, {"memory_budget_mb": 1}, {"strategy": "loop"}):
        eng = _engine(model, **cfg, **kw)
        r = eng.compute(x, layers=[1, -1])
        for L in r.layers:
            np.testing.assert_allclose(r.values[L], base.values[L], rtol=1e-5, atol=1e-9 * base.values[L].max())
        if "chunk_size" in kw:
            assert all(c <= kw["chunk_size"] for _, c, _ in eng.chunks_used)
    assert eng.strategy_used == "loop"


def test_nan_samples_are_reported_by_id():
    model = copy.deepcopy(tiny_model("llama"))
    with torch.no_grad():
        model.get_input_embeddings().weight[7] = float("nan")
    rows = [random_ids(5, seed=s) for s in (1, 2, 3)]
    for r in rows:
        r[r == 7] = 8
    rows[1][2] = 7
    with pytest.raises(NonFiniteGradientError, match=r"sample_ids \[31\]") as ei:
        _engine(model, estimator="exact", mode="forward").compute(torch.stack(rows), layers=[1, -1],
                                                                  sample_ids=[30, 31, 32])
    part = ei.value.partial
    assert part.mode == "forward" and not part.mask[1].any() and part.mask[[0, 2]].all()


def test_projection_is_reverse_only():
    with pytest.raises(ValueError, match="mode 'forward' cannot compute estimator 'projection'"):
        SensitivityConfig(estimator="projection", mode="forward")
    cfg = SensitivityConfig(estimator="projection", mode="auto")
    assert pick_mode(cfg, layers=range(31), seq=32, hidden=8, d_model=8, causal=True) is Mode.REVERSE
    r = _engine(tiny_model("llama"), estimator="projection").compute(random_ids(5, seed=1)[None], layers=[0, 1, 2, 3])
    assert r.mode == "reverse"


def test_mode_is_in_the_config_dict_and_validated():
    assert SensitivityConfig().mode is Mode.AUTO
    assert SensitivityConfig(mode="forward").to_dict()["mode"] == "forward"
    assert SensitivityConfig.from_dict({"mode": "reverse"}).mode is Mode.REVERSE
    with pytest.raises(ValueError, match="unknown mode 'sideways'"):
        SensitivityConfig(mode="sideways")


def test_cost_model_on_a_few_shapes():
    hut = SensitivityConfig(estimator="hutchinson", num_probes=1)
    kw = dict(seq=32, hidden=576, d_model=576, causal=True)
    # many layers: forward (one pass for all of them)
    assert pick_mode(hut, layers=range(31), **kw) is Mode.FORWARD
    assert pick_mode(hut, layers=[10, 20, 30], **kw) is Mode.FORWARD
    # one layer, K=1, both manual: the same passes, a forward pass measured 1.9x a reverse one (causal)
    c = mode_costs(layers=[30], seq=32, out_directions=1, in_directions=1, causal=True)
    assert c["forward"] == pytest.approx(1.9 * c["reverse"])
    assert pick_mode(hut, layers=[30], **kw) is Mode.REVERSE
    # two layers, one shallow: reverse pays 15 + 30 block passes, forward 30 at 1.9x: reverse
    assert pick_mode(hut, layers=[15, 30], **kw) is Mode.REVERSE
    assert pick_mode(hut, layers=[28, 29, 30], **kw) is Mode.FORWARD
    # non-causal (BERT): a forward pass ~1.1x a reverse one, so two full-depth layers already favour it
    nc = dict(seq=32, hidden=384, d_model=384, causal=False)
    assert pick_mode(hut, layers=[6], **nc) is Mode.REVERSE
    assert pick_mode(hut, layers=[5, 6], **nc) is Mode.FORWARD
    # one layer without a manual forward (generic path runs the whole sequence): reverse
    assert pick_mode(hut, layers=[30], manual_forward=False, **kw) is Mode.REVERSE
    # exact with d_model < hidden favours forward, d_model > hidden reverse (one layer)
    ex = SensitivityConfig(estimator="exact")
    assert pick_mode(ex, layers=[6], seq=16, hidden=384, d_model=128, causal=False) is Mode.FORWARD
    assert pick_mode(ex, layers=[6], seq=16, hidden=128, d_model=384, causal=False) is Mode.REVERSE
    # an explicit mode is kept
    assert pick_mode(SensitivityConfig(mode="reverse"), layers=range(31), **kw) is Mode.REVERSE


def test_auto_mode_is_recorded_in_the_result():
    model = tiny_model("bert")
    eng = _engine(model)
    r = eng.compute(random_ids(5, seed=1)[None], layers=[0, 1, 2, 3])
    assert r.mode == eng.mode_used == eng.mode_for([0, 1, 2, 3], 5).value == "forward"
    r = eng.compute(random_ids(5, seed=1)[None], layers=[1])
    assert r.mode == "reverse" and r.strategy == "manual" and eng.mode_used == "reverse"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_manual_tangent_path_equals_generic(models, kind):
    """The Llama-family tangent path (causal suffix segments on the shared forward) against the
    generic ``torch.func.jvp`` path, padded batch, Hutchinson K=2 (the same probes)."""
    model = models[kind]
    ids, am = padded([random_ids(9, seed=1), random_ids(6, seed=2), random_ids(8, seed=3)], "left")
    cfg = dict(estimator="hutchinson", num_probes=2, seed=3, mode="forward")
    man = _engine(model, **cfg)
    gen = _engine(model, strategy="vmap", **cfg)
    layers = list(range(N_LAYERS + 1))
    a, b = man.compute(ids, am, layers=layers), gen.compute(ids, am, layers=layers)
    assert a.strategy == "manual" and b.strategy == "vmap" and len(man._manual_fwd.segments(9)) > 1
    for L in layers:
        np.testing.assert_allclose(a.values[L], b.values[L], rtol=1e-4, atol=1e-7 * b.values[L].max())
        np.testing.assert_allclose(a.noise[L], b.noise[L], rtol=1e-3, atol=1e-7 * b.noise[L].max())


@pytest.mark.parametrize("kind", FORWARD_KINDS)
def test_fallback_when_the_manual_tangent_check_fails(models, kind, monkeypatch):
    from raysens.core.passes import forward

    monkeypatch.setattr(forward.ManualForward, "check", lambda self, f, rtol=1e-4: "planted failure")
    model = models[kind]
    eng = _engine(model, estimator="exact", mode="forward")
    assert eng._manual_fwd is None
    x = random_ids(5, seed=2)
    r = eng.compute(x[None], layers=[1, -1])
    assert r.strategy == "vmap" and r.mode == "forward"
    for L in r.layers:
        assert rel_fro(r.values[L][0], reference(model, x, L)[0]) <= 1e-5


def test_cpu_sample_groups_and_packs_are_sized_by_backward_tokens(models, monkeypatch):
    """A packed causal pass (stacks/packing.py) runs each tangent row on its own suffix: the CPU
    sample group is backward_tokens // (K · S) samples (96 // 8 = 12 -> all 6 here), and a pack holds
    backward_tokens // (group · S) rows (96 // 48 = 2 input positions); numbers as the default grouping."""
    model = models["llama"]
    ids, am = padded([random_ids(8, seed=s) for s in range(6)], "right")
    eng = _engine(model, mode="forward", backward_tokens=96)
    stack = eng._manual_fwd.stack
    seen = []
    orig = type(stack).jvp_packed

    def spy(self, fwd, layer_ids, dx, pack):
        seen.append((pack.batch, sum(c for _, c in pack.pieces), dx.shape[0]))
        return orig(self, fwd, layer_ids, dx, pack)

    monkeypatch.setattr(type(stack), "jvp_packed", spy)
    res = eng.compute(ids, am, layers=[1, N_LAYERS])
    assert res.strategy == "manual" and eng._manual_fwd.packed
    assert [b for b, _, _ in seen] == [6] * 4 and [c for _, c, _ in seen] == [2] * 4
    assert [r for _, _, r in seen] == [6 * (8 + 7), 6 * (6 + 5), 6 * (4 + 3), 6 * (2 + 1)]  # suffix tokens only
    ref = _engine(model, mode="forward").compute(ids, am, layers=[1, N_LAYERS])  # the default grouping
    for L in (1, N_LAYERS):
        np.testing.assert_allclose(res.values[L], ref.values[L], rtol=1e-5, atol=1e-7)
