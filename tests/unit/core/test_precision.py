"""``SensitivityConfig.precision`` (docs/DESIGN.md §1.12): ``bf16`` within its documented bound of
``fp32`` on the five hand-written architectures (forward and reverse mode) and on the generic autograd
path, and not equal to it (the bf16 GEMMs really ran); the bf16 weight copies made once per engine;
``fp32`` the default and bitwise the results without the option; ``tf32`` refused on CPU; unknown
values refused naming the option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import N_LAYERS, make_model, padded, random_ids, rel_fro
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.passes import precision
from raysens.core.passes.precision import BF16_GENERIC_BOUND, BF16_MAP_BOUND

ARCHS = ("llama", "mistral", "qwen2", "gpt2", "bert")
LAYERS = list(range(N_LAYERS + 1))


@pytest.fixture(scope="module")
def models():
    return {k: make_model(k, seed=3) for k in ARCHS}


@pytest.fixture(scope="module")
def batch():
    return padded([random_ids(9, seed=1), random_ids(6, seed=2), random_ids(8, seed=3)], "left")


def _pair(model, batch, **cfg):
    ids, am = batch
    out = {}
    for prec in ("fp32", "bf16"):
        eng = SensitivityEngine(model, SensitivityConfig(estimator="exact", precision=prec, **cfg))
        out[prec] = (eng, eng.compute(ids, am, layers=LAYERS))
    return out


def _check_bound(out, strategy: str, bound: float = BF16_MAP_BOUND):
    (_, a), (_, b) = out["fp32"], out["bf16"]
    assert a.strategy == b.strategy == strategy
    for L in LAYERS[1:]:  # layer 0 is the identity map, exact in any precision
        err = rel_fro(b.values[L], a.values[L])
        assert err <= bound, (L, err)
        assert err >= 1e-5, (L, err)  # bf16 rounding really happened (float32 noise is ~1e-7)
        assert np.isfinite(b.values[L]).all()
        assert not b.values[L][~a.mask].any()  # padded cells stay 0
    np.testing.assert_array_equal(b.values[0], a.values[0])


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_hand_written_within_bound(models, batch, arch, mode):
    _check_bound(_pair(models[arch], batch, mode=mode), "manual")


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_bf16_generic_path_within_bound(models, batch, arch, mode):
    """The generic autograd / ``torch.func`` path (strategy vmap) under bf16 autocast."""
    _check_bound(_pair(models[arch], batch, mode=mode, strategy="vmap"), "vmap", BF16_GENERIC_BOUND)


def test_bf16_hutchinson_close_to_fp32_with_the_same_probes(models, batch):
    """Hutchinson K=2: the same probes in both precisions, so the estimates differ by rounding only."""
    ids, am = batch
    res = {p: SensitivityEngine(models["llama"], SensitivityConfig(num_probes=2, seed=5, precision=p))
           .compute(ids, am, layers=LAYERS) for p in ("fp32", "bf16")}
    for L in LAYERS[1:]:
        assert 1e-5 <= rel_fro(res["bf16"].values[L], res["fp32"].values[L]) <= BF16_MAP_BOUND
        assert rel_fro(res["bf16"].noise[L], res["fp32"].noise[L]) <= 5 * BF16_MAP_BOUND


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_bf16_weight_copies_made_once_per_engine(models, batch, arch):
    ids, am = batch
    eng = SensitivityEngine(models[arch], SensitivityConfig(estimator="exact", precision="bf16", mode="forward"))
    eng.compute(ids, am, layers=LAYERS)
    cache = eng._manual._wcache
    assert cache and all(w.dtype == torch.bfloat16 for w, _ in cache.values())
    first = {k: w.data_ptr() for k, (w, _) in cache.items()}
    eng.compute(ids, am, layers=LAYERS)
    assert {k: w.data_ptr() for k, (w, _) in eng._manual._wcache.items()} == first
    for p in models[arch].parameters():  # the user's model is untouched: float32
        assert p.dtype == torch.float32


def test_fp32_is_the_default_and_unchanged(models, batch):
    ids, am = batch
    assert SensitivityConfig().precision.value == "fp32"
    for mode in ("forward", "reverse"):
        a = SensitivityEngine(models["qwen2"], SensitivityConfig(mode=mode, num_probes=2)).compute(ids, am, layers=LAYERS)
        b = SensitivityEngine(models["qwen2"], SensitivityConfig(mode=mode, num_probes=2, precision="fp32")).compute(
            ids, am, layers=LAYERS)
        for L in LAYERS:
            np.testing.assert_array_equal(a.values[L], b.values[L])


def test_tf32_is_refused_on_cpu(models):
    with pytest.raises(ValueError, match=r"SensitivityEngine: precision 'tf32' needs a CUDA device"):
        SensitivityEngine(models["gpt2"], SensitivityConfig(precision="tf32"))


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match=r"SensitivityConfig: unknown precision 'fp16'; choose from"):
        SensitivityConfig(precision="fp16")
    with pytest.raises(ValueError, match="unknown keys"):
        SensitivityConfig.from_dict({"precison": "bf16"})


@pytest.mark.parametrize("flags,want", [("fpu sse avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                                        ("fpu sse avx2 avx512f avx512bw", False)])
def test_cpu_bf16_support_is_read_from_the_flags(tmp_path, flags, want):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert precision.cpu_has_bf16(str(info)) is want
    (tmp_path / "noflags").write_text("processor\t: 0\nmodel name\t: arm\n")
    assert precision.cpu_has_bf16(str(tmp_path / "noflags")) is None
    assert precision.cpu_has_bf16(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("native,warns", [(False, True), (True, False), (None, False)])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(models, monkeypatch, native, warns):
    """Emulated bf16 products are slower than fp32: say so once per engine (results unaffected)."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)
    import warnings

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        SensitivityEngine(models["gpt2"], SensitivityConfig(precision="bf16"))
        SensitivityEngine(models["gpt2"], SensitivityConfig(precision="fp32"))
    msgs = [str(w.message) for w in got if issubclass(w.category, RuntimeWarning) and "bf16 instructions" in str(w.message)]
    assert len(msgs) == int(warns), msgs
    if warns:
        assert "SensitivityEngine: precision 'bf16'" in msgs[0] and "use precision 'fp32'" in msgs[0]
