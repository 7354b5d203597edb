"""``SensitivityConfig.fusion`` (``core/stacks/fusion.py``, issue 30): the fused tangent kernels against
independent references and against the eager path. The float64 ``jacrev`` oracles run on the fused
path in ``test_forward.py::test_exact_forward_matches_jacrev_at_every_layer`` (parametrized over
fusion); here: the fused path within the documented bound of the eager one (Hutchinson, the same
probes, Llama/GQA, GPT-2 with causal suffix segments, BERT), a sample's numbers the same alone and in
a padded batch of 3, the eager default unchanged (its kernels are today's functions), the one-off
choice (auto falls back to eager with one warning naming why; compile refuses), the config field,
bf16 on the fused path within the bf16 bound, the same bits at 1 and 2 threads; the compiled-kernel
cache: auto's per-family rule, the bound (a full cache refuses new engines, not running ones), and 12
engines (models x dtypes x thread counts) in one process, each within its bound of eager, every
compiled copy with one graph (the full suite once failed on dynamo's recompile limit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import N_LAYERS, by_thread_count, make_model, padded, random_ids
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.stacks import fusion

KINDS = ("llama", "gpt2", "bert")


@pytest.fixture(scope="module")
def models():
    return {k: make_model(k, seed=7) for k in KINDS}


def _engine(model, **cfg):
    return SensitivityEngine(model, SensitivityConfig(**cfg))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_eager_within_its_bound(models, kind):
    """Hutchinson K=2, the same probes, every layer: fused and eager agree to float32 rounding (the
    fused kernels sum in another order); the fused engine really runs the compiled kernels."""
    model = models[kind]
    ids, am = padded([random_ids(9, seed=1), random_ids(6, seed=2), random_ids(8, seed=3)], "right")
    cfg = dict(estimator="hutchinson", num_probes=2, seed=3, mode="forward")
    eager, fused = _engine(model, **cfg), _engine(model, fusion="compile", **cfg)
    assert eager.fusion_used == "eager" and fused.fusion_used == "compile"
    assert fused._manual.kern is not fusion.EAGER and eager._manual.kern is fusion.EAGER
    layers = list(range(N_LAYERS + 1))
    a, b = fused.compute(ids, am, layers=layers), eager.compute(ids, am, layers=layers)
    assert a.strategy == b.strategy == "manual"
    for L in layers:
        np.testing.assert_allclose(a.values[L], b.values[L], rtol=1e-4, atol=1e-6 * b.values[L].max())


@pytest.mark.parametrize("kind", KINDS)
def test_fused_sample_is_the_same_alone_and_in_a_padded_batch(models, kind):
    """The bit-for-bit guarantee on the fused path: a sample alone and as the middle of a padded batch
    of 3 (both sides) gives the same numbers (a bound of 1e-6 relative where the batch changes the
    GEMM shapes, as the eager path's test allows)."""
    model = models[kind]
    x = random_ids(6, seed=21)
    cfg = dict(estimator="hutchinson", num_probes=3, mode="forward", seed=5, fusion="compile")
    alone = _engine(model, **cfg).compute(x[None], layers=[1, -1], sample_ids=[9])
    for side in ("left", "right"):
        ids, am = padded([random_ids(3, seed=1), x, random_ids(8, seed=2)], side, pad=7)
        r = _engine(model, **cfg).compute(ids, am, layers=[1, -1], sample_ids=[1, 9, 2])
        assert r.strategy == "manual"
        for L in alone.layers:
            np.testing.assert_allclose(r.values[L][1, :6, :6], alone.values[L][0], rtol=1e-6,
                                       atol=1e-7 * alone.values[L].max())


def test_eager_is_the_default_and_todays_code():
    """``eager`` (the default) runs today's functions themselves: results unchanged bit for bit."""
    from raysens.core.stacks.llama_tangent import _norm_tangent, _rope
    from raysens.core.stacks.tangents import ln_tangent

    assert SensitivityConfig().fusion.value == "eager"
    assert "fusion" not in SensitivityConfig().to_dict()  # run fingerprints of existing configs unchanged
    assert SensitivityConfig(fusion="auto").to_dict()["fusion"] == "auto"
    k = fusion.pick_kernels("eager", torch.device("cpu"))
    assert k is fusion.EAGER and k.ln_tangent is ln_tangent and k.rope is _rope and k.att_mid is None
    g = torch.Generator().manual_seed(0)
    dx, xn, r, w = (torch.randn(2, 3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g),
                    torch.rand(3, 4, 1, generator=g), torch.randn(8, generator=g))
    assert torch.equal(k.rms_tangent(dx, xn, r, w, torch.bfloat16), _norm_tangent(dx, xn, r, w))


def test_unknown_fusion_value_is_a_clear_error():
    with pytest.raises(ValueError, match="fusion"):
        SensitivityConfig(fusion="fast")


def test_auto_falls_back_to_eager_with_one_warning_naming_why(models, monkeypatch):
    def broken():
        raise RuntimeError("no C++ compiler found\nmore lines")

    monkeypatch.setattr(fusion, "AUTO_FAMILIES", frozenset({"bert"}))  # an auto family for the test
    monkeypatch.setattr(fusion, "_PROCESS", {})
    monkeypatch.setattr(fusion, "compiled_kernels", broken)
    with pytest.warns(RuntimeWarning, match="fusion 'auto' uses the eager.*no C\\+\\+ compiler found"):
        eng = _engine(models["bert"], mode="forward", fusion="auto")
    assert eng.fusion_used == "eager" and eng._manual.kern is fusion.EAGER
    assert "no C++ compiler found" in eng.fusion_info["why"] and eng.fusion_info["used"] == "eager"
    with pytest.raises(ValueError, match="fusion 'compile' does not work here"):
        _engine(models["llama"], mode="forward", fusion="compile")


def test_auto_rejects_kernels_that_disagree_with_eager(monkeypatch):
    """The trial's numerical check: a fused kernel off by 1e-3 is not used."""
    good = fusion.compiled_kernels

    def off():
        import dataclasses

        k = good()
        return dataclasses.replace(k, rope=lambda x, c, s: k.rope(x, c, s) * 1.001)

    monkeypatch.setattr(fusion, "_PROCESS", {})
    monkeypatch.setattr(fusion, "compiled_kernels", off)
    with pytest.warns(RuntimeWarning, match="fused rope differs from eager"):
        assert fusion.pick_kernels("auto", torch.device("cpu")) is fusion.EAGER


def test_auto_compiles_once_per_process(models, monkeypatch):
    """The trial compile runs once per process (one Ray actor): a second engine reuses the same kernels
    (BERT made an ``auto`` family for the test: none is one on CPU today)."""
    monkeypatch.setattr(fusion, "AUTO_FAMILIES", frozenset({"bert"}))
    a = _engine(models["bert"], mode="forward", fusion="auto")
    b = _engine(models["bert"], mode="forward", fusion="auto", num_probes=3)
    if a.fusion_used == "compile":
        assert a._manual.kern is b._manual.kern
        assert a.fusion_info["asked"] == "auto" and a.fusion_info["used"] == "compile"
    else:  # no working compiler on this machine: both fell back
        assert b.fusion_used == "eager"


def test_auto_uses_eager_where_fusion_does_not_pay(models, recwarn):
    """``auto`` compiles only the stacks where fused was measured faster (``AUTO_FAMILIES``: none on CPU
    today); a stack outside it runs eager, without a warning, and the manifest's record says why."""
    for kind in ("llama", "gpt2", "bert"):
        eng = _engine(models[kind], mode="forward", fusion="auto")
        assert eng.fusion_used == "eager" and eng._manual.kern is fusion.EAGER
        assert f"on a {kind} stack" in eng.fusion_info["why"]
    assert not [w for w in recwarn if "fusion" in str(w.message)]
    assert _engine(models["llama"], mode="forward", fusion="compile").fusion_used == "compile"


def test_a_full_cache_refuses_new_engines_not_running_ones(models, monkeypatch):
    """The bound on compiled variants: with fewer than ``KEYS_RESERVED`` keys left, a new engine's
    ``auto`` runs eager with one warning naming the cache, ``compile`` refuses in one line; an engine
    built before keeps its kernels."""
    monkeypatch.setattr(fusion, "AUTO_FAMILIES", frozenset({"bert"}))  # an auto family for the test
    built = _engine(models["bert"], mode="forward", fusion="compile")
    monkeypatch.setattr(fusion, "MAX_KEYS", built._manual.kern.keys_used() + fusion.KEYS_RESERVED - 1)
    with pytest.warns(RuntimeWarning, match="fusion 'auto' uses the eager.*cache is full"):
        assert _engine(models["bert"], mode="forward", fusion="auto").fusion_used == "eager"
    with pytest.raises(ValueError, match="fusion 'compile' does not work here.*cache is full"):
        _engine(models["bert"], mode="forward", fusion="compile")
    assert built.fusion_used == "compile"


def test_fused_bf16_keeps_the_bf16_bound(models):
    """precision bf16 on the fused path (the norm tangent rounded to bf16 inside its kernel, rotary and
    the gate fused in bf16, the attention eager): every exact map within ``BF16_MAP_BOUND`` of fp32."""
    import warnings

    from raysens.core.passes.precision import BF16_MAP_BOUND

    model = models["llama"]
    ids, am = padded([random_ids(7, seed=4), random_ids(5, seed=6)], "right")
    ref = _engine(model, estimator="exact", mode="forward").compute(ids, am, layers=list(range(N_LAYERS + 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 on a CPU without bf16 instructions: slower only
        eng = _engine(model, estimator="exact", mode="forward", precision="bf16", fusion="compile")
    assert eng.fusion_used == "compile"
    got = eng.compute(ids, am, layers=list(range(N_LAYERS + 1)))
    for L in ref.layers:
        err = float(np.linalg.norm(got.values[L] - ref.values[L]) / np.linalg.norm(ref.values[L]))
        assert err <= BF16_MAP_BOUND, (L, err)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_numbers_do_not_depend_on_the_thread_count(models, kind):
    """The fused kernels (inductor's OpenMP loops) give the same bits at 1 and 2 threads (Ray actors
    and the in-process path run different thread counts)."""
    ids, am = padded([random_ids(5, seed=1), random_ids(3, seed=2), random_ids(1, seed=4)], "right")
    eng = _engine(models[kind], estimator="hutchinson", num_probes=2, mode="forward", fusion="compile")
    out = by_thread_count(eng, ids, am, [0, 1, -1])
    assert out[1].strategy == "manual"
    for L in out[1].layers:
        np.testing.assert_array_equal(out[1].values[L], out[2].values[L])


def test_many_engines_in_one_process_compile_each_variant_once(models):
    """What a test suite, a sweep or a paired run does in one process: 12 engines with fusion 'compile'
    (3 models x fp32/bf16 x 1/2 threads), each against the eager path within the documented bound
    (fp32: the float32 rounding bound of ``test_fused_equals_eager_within_its_bound``; bf16: every map
    within ``BF16_MAP_BOUND`` of eager fp32). Dynamo's per-code-object recompile limit is never met:
    every compiled copy of every kernel holds exactly one graph."""
    import warnings

    from raysens.core.passes.precision import BF16_MAP_BOUND

    before = torch.get_num_threads()
    ids, am = padded([random_ids(7, seed=11), random_ids(1, seed=12), random_ids(4, seed=13)], "right")
    layers = list(range(N_LAYERS + 1))
    cfg = dict(estimator="hutchinson", num_probes=2, seed=4, mode="forward")
    ref = {k: _engine(models[k], **cfg).compute(ids, am, layers=layers) for k in KINDS}
    runs = 0
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for kind in KINDS:
                for precision in ("fp32", "bf16"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 without bf16 instructions
                        eng = _engine(models[kind], precision=precision, fusion="compile", **cfg)
                    assert eng.fusion_used == "compile"
                    got, want = eng.compute(ids, am, layers=layers), ref[kind]
                    for L in layers:
                        if precision == "fp32":
                            np.testing.assert_allclose(got.values[L], want.values[L], rtol=1e-4,
                                                       atol=1e-6 * want.values[L].max())
                        else:
                            err = np.linalg.norm(got.values[L] - want.values[L]) / np.linalg.norm(want.values[L])
                            assert err <= BF16_MAP_BOUND, (kind, threads, L, err)
                    runs += 1
    finally:
        torch.set_num_threads(before)
    assert runs == 12
    kern = fusion.pick_kernels("compile", torch.device("cpu"))
    assert 2 <= kern.keys_used() <= fusion.MAX_KEYS
    for part in kern.parts:
        assert all(n == 1 for n in part.graphs()), (part.f.__name__, part.graphs())


def test_a_new_key_past_the_bound_raises_instead_of_changing_path(monkeypatch):
    """A compiled kernel's copies per key: the same key reuses its copy (one graph), a new key past
    ``MAX_KEYS`` raises ``FusionCacheFull`` (a run never switches to other numbers mid-way)."""
    k = fusion._Compiled(fusion._act_fused)
    y, d = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        np.testing.assert_allclose(k(y, d).numpy(), (y * d).numpy(), rtol=1e-6)
        k(y[:2], d[:2])  # other sizes, same key
        assert len(k.by_key) == 1 and k.graphs() == [1]
        monkeypatch.setattr(fusion, "MAX_KEYS", 1)
        with pytest.raises(fusion.FusionCacheFull, match="1 compiled variants"):
            k(y.double(), d.double())
