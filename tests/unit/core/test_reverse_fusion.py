"""``SensitivityConfig.fusion`` on the reverse pass (``core/passes/backward_fusion.py``, issue 30): the
manual backward with fused norm / softmax / squared-norm kernels against float64 ``torch.func.jacrev``
(Llama/GQA, GPT-2, BERT, eager and compile), within the documented bound of the eager path, a sample's
numbers the same alone and in a padded batch of 3, the same bits at 1 and 2 threads, eager unchanged
(no kernels installed), the one-off choice (auto falls back with one warning, compile refuses), and
the keyed compilation: a dozen engine configurations (models, lengths, batch sizes, thread counts,
bf16, estimators) in one process without a compile failure, each checked against its eager twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import N_LAYERS, by_thread_count, make_model, padded, random_ids, reference, rel_fro
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.passes import backward_fusion as bf

KINDS = ("llama", "gpt2", "bert")
ORACLE_TOL = 1e-5  # manual reverse vs float64 jacrev (tests/unit/core/stacks/test_stacks.py's bound)
EAGER_BOUND = 1e-5  # fused vs eager, relative Frobenius per layer map (float32 sums in another order)


@pytest.fixture(scope="module")
def models():
    return {k: make_model(k, seed=7) for k in KINDS}


def _engine(model, **cfg):
    return SensitivityEngine(model, SensitivityConfig(**cfg))


@pytest.mark.parametrize("fusion", ["eager", "compile"])
@pytest.mark.parametrize("kind", KINDS)
def test_reverse_exact_matches_jacrev_on_every_fusion(models, kind, fusion):
    """The oracle: ``exact`` reverse maps of a right-padded batch at every layer against float64 jacrev."""
    model = models[kind]
    eng = _engine(model, estimator="exact", mode="reverse", strategy="manual", chunk_size=13, fusion=fusion)
    assert eng.reverse_fusion_used == fusion
    lengths = [7, 4, 6]
    ids, am = padded([random_ids(n, seed=30 + r) for r, n in enumerate(lengths)], "right")
    layers = list(range(N_LAYERS + 1))
    r = eng.compute(ids, am, layers=layers)
    assert r.strategy == "manual" and r.mode == "reverse"
    for L in layers:
        for s, n in enumerate(lengths):
            want, _ = reference(model, ids[s, :n], L)
            v = r.values[L][s]
            assert rel_fro(v[:n, :n], want) <= ORACLE_TOL, (L, s)
            assert (v[n:] == 0).all() and (v[:, n:] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fused_reverse_within_its_bound_of_eager(models, kind):
    """Hutchinson K=2 with the same probes, every layer: fused and eager maps within ``EAGER_BOUND``;
    the fused engine really runs the compiled kernels and the eager one none."""
    model = models[kind]
    ids, am = padded([random_ids(9, seed=1), random_ids(6, seed=2), random_ids(8, seed=3)], "right")
    cfg = dict(estimator="hutchinson", num_probes=2, seed=3, mode="reverse")
    eager, fused = _engine(model, **cfg), _engine(model, fusion="compile", **cfg)
    assert eager._manual.bkern is None and isinstance(fused._manual.bkern, bf.BackwardKernels)
    layers = list(range(N_LAYERS + 1))
    a, b = fused.compute(ids, am, layers=layers), eager.compute(ids, am, layers=layers)
    assert a.strategy == b.strategy == "manual"
    moved = 0
    for L in layers:
        assert rel_fro(a.values[L], b.values[L]) <= EAGER_BOUND, L
        moved += int(not np.array_equal(a.values[L], b.values[L]))
    assert moved, "the fused path gave eager's bits exactly: the kernels did not run"


@pytest.mark.parametrize("kind", KINDS)
def test_fused_reverse_sample_alone_equals_it_in_a_batch_of_3(models, kind):
    """A sample alone and as the middle of a right-padded batch of 3 gives the same numbers on the
    fused reverse path (bound 1e-6 relative, the eager path's where the batch changes GEMM shapes)."""
    model = models[kind]
    x = random_ids(6, seed=21)
    cfg = dict(estimator="hutchinson", num_probes=3, mode="reverse", seed=5, fusion="compile")
    alone = _engine(model, **cfg).compute(x[None], layers=[1, -1], sample_ids=[9])
    ids, am = padded([random_ids(3, seed=1), x, random_ids(8, seed=2)], "right", pad=7)
    r = _engine(model, **cfg).compute(ids, am, layers=[1, -1], sample_ids=[1, 9, 2])
    assert r.strategy == "manual"
    for L in alone.layers:
        np.testing.assert_allclose(r.values[L][1, :6, :6], alone.values[L][0], rtol=1e-6,
                                   atol=1e-7 * alone.values[L].max())


@pytest.mark.parametrize("kind", KINDS)
def test_fused_reverse_same_bits_at_1_and_2_threads(models, kind):
    ids, am = padded([random_ids(5, seed=1), random_ids(3, seed=2), random_ids(2, seed=4)], "right")
    eng = _engine(models[kind], estimator="hutchinson", num_probes=2, mode="reverse", fusion="compile")
    out = by_thread_count(eng, ids, am, [0, 1, -1])
    for L in out[1].layers:
        np.testing.assert_array_equal(out[1].values[L], out[2].values[L])


def test_eager_installs_no_kernels_and_forward_mode_none(models):
    assert _engine(models["llama"], mode="reverse")._manual.bkern is None  # today's code, bit for bit
    assert _engine(models["llama"], mode="forward", fusion="compile")._manual.bkern is None
    assert _engine(models["llama"], mode="auto", fusion="compile").reverse_fusion_used == "compile"


def test_auto_falls_back_to_eager_with_one_warning_and_compile_refuses(models, monkeypatch):
    def broken():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(bf, "_PROCESS", {})
    monkeypatch.setattr(bf, "compiled_backward_kernels", broken)
    with pytest.warns(RuntimeWarning, match="runs the reverse pass eagerly.*no C\\+\\+ compiler found"):
        assert bf.pick_backward_kernels("auto", torch.device("cpu")) is None
    eng = _engine(models["gpt2"], mode="reverse", fusion="auto")  # the engine's auto: the backward eager (measured)
    assert eng.reverse_fusion_used == "eager" and eng._manual.bkern is None
    with pytest.raises(ValueError, match="fusion 'compile' does not work here for the reverse pass"):
        _engine(models["gpt2"], mode="reverse", fusion="compile")


def test_trial_rejects_kernels_that_disagree_with_eager(monkeypatch):
    import dataclasses

    good = bf.compiled_backward_kernels

    def off():
        k = good()
        return dataclasses.replace(k, softmax=lambda gp, p, s, dt: k.softmax(gp, p, s * 1.001, dt))

    monkeypatch.setattr(bf, "_PROCESS", {})
    monkeypatch.setattr(bf, "compiled_backward_kernels", off)
    with pytest.warns(RuntimeWarning, match="fused softmax differs from eager"):
        assert bf.pick_backward_kernels("auto", torch.device("cpu")) is None


def test_keyed_compiles_one_code_object_per_key_and_checks_numbers():
    """``_Keyed``: another dtype, another size-1 pattern or thread count is a new key with its own code
    object; sample-group offsets, lengths and batch sizes within a key reuse it; numbers match eager."""
    k = bf._Keyed(bf._rms)
    gen = torch.Generator().manual_seed(0)
    X, R, w = torch.randn(12, 9, 16, generator=gen), torch.rand(12, 9, generator=gen) + 0.5, torch.randn(16, generator=gen)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            for threads, dt, (g0, g1, c, b) in [(2, torch.float32, (0, 4, 3, 5)), (2, torch.float32, (4, 8, 2, 7)),
                                                (2, torch.float32, (2, 12, 5, 9)), (2, torch.float64, (0, 4, 3, 5)),
                                                (2, torch.float32, (3, 4, 3, 5)), (1, torch.float32, (0, 4, 3, 5))]:
                torch.set_num_threads(threads)
                gn = torch.randn(c, g1 - g0, b, 16, generator=gen).to(dt)
                xn, r = X[g0:g1].to(dt), R[g0:g1].to(dt)
                out = k(gn, xn, r, w.to(dt))
                want = bf._rms_eager(gn, xn[:, :b], r[:, :b, None], w.to(dt))
                assert rel_fro(out.double(), want.double()) <= 1e-6
    finally:
        torch.set_num_threads(before)
    assert k.graphs() == 4  # (2 threads, f32), (2, f64), (2, f32, batch of 1), (1 thread, f32)
    codes = {id(fn._torchdynamo_orig_callable.__code__) for fn, _ in k.fns.values()}
    assert len(codes) == 4 and id(bf._rms.__code__) not in codes


def test_many_engine_configurations_in_one_process(models):
    """A dozen configurations through the fused reverse path in one process (the forward fusion once
    failed CI on dynamo's 8-graphs-per-code-object limit): no compile failure, each within its bound
    of an eager engine of the same configuration, every kernel's keys within ``MAX_KEYS``."""
    qwen = make_model("qwen2", seed=3)
    configs = [
        ("llama", dict(estimator="hutchinson", num_probes=1), 2, [5, 3]),
        ("llama", dict(estimator="hutchinson", num_probes=2), 1, [9, 9, 2, 7]),
        ("llama", dict(estimator="exact"), 2, [4]),
        ("llama", dict(estimator="projection", causal_segments=1), 2, [11, 6]),
        ("llama", dict(estimator="hutchinson", num_probes=1, precision="bf16"), 2, [6, 5]),
        ("gpt2", dict(estimator="hutchinson", num_probes=1), 2, [8, 3, 5]),
        ("gpt2", dict(estimator="exact", chunk_size=7), 1, [6]),
        ("gpt2", dict(estimator="hutchinson", num_probes=3, precision="bf16"), 2, [7, 7]),
        ("bert", dict(estimator="hutchinson", num_probes=1), 2, [10, 4]),
        ("bert", dict(estimator="exact"), 1, [5, 5, 5]),
        ("bert", dict(estimator="hutchinson", num_probes=2, precision="bf16"), 2, [12]),
        ("qwen2", dict(estimator="hutchinson", num_probes=2), 2, [6, 4]),
        ("qwen2", dict(estimator="projection"), 1, [13, 1]),
    ]
    before = torch.get_num_threads()
    try:
        for i, (kind, cfg, threads, lengths) in enumerate(configs):
            torch.set_num_threads(threads)
            model = qwen if kind == "qwen2" else models[kind]
            ids, am = padded([random_ids(n, seed=40 + i + r) for r, n in enumerate(lengths)], "right")
            bound = 2e-2 if cfg.get("precision") == "bf16" else EAGER_BOUND  # bf16: its own documented bound
            fused = _engine(model, mode="reverse", fusion="compile", seed=i, **cfg)
            eager = _engine(model, mode="reverse", seed=i, **cfg)
            a = fused.compute(ids, am, layers=[1, -1])
            b = eager.compute(ids, am, layers=[1, -1])
            assert a.strategy == "manual" and fused.reverse_fusion_used == "compile", (kind, cfg)
            for L in a.layers:
                assert rel_fro(a.values[L], b.values[L]) <= bound, (i, kind, cfg, L)
    finally:
        torch.set_num_threads(before)
    kern = bf.pick_backward_kernels("compile", torch.device("cpu"))
    for name in ("rms_add", "rms", "ln_add", "ln", "softmax", "sqnorm"):
        keyed = getattr(kern, name)
        assert keyed.graphs() <= bf.MAX_KEYS
        assert all(gen < bf.MAX_GENERATIONS for _, gen in keyed.fns.values())
