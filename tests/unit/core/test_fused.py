"""Fused RMSNorm backward (raysens/fused.py) against autograd through Hugging Face's own module."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from refs import N_LAYERS, make_model, random_ids, reference, rel_fro
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.passes.fused import _RMSNormFn, install_fused_norms, uninstall_fused_norms


def test_rmsnorm_fn_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda t: _RMSNormFn.apply(t, w, 1e-6)[0], (x,))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_norm_matches_the_modules_own_backward_batched(kind):
    model = make_model(kind).eval()
    norm = model.base_model.norm
    x = torch.randn(2, 5, norm.weight.shape[0], requires_grad=True)
    v = torch.randn(6, 2, 5, norm.weight.shape[0])  # 6 cotangents, batched like the engine does
    y = norm(x)
    want = torch.autograd.grad(y, x, v, is_grads_batched=True)[0]
    for p in model.parameters():
        p.requires_grad_(False)
    assert install_fused_norms(model) == 2 * N_LAYERS + 1
    y2 = norm(x)
    assert norm._raysens_fused
    torch.testing.assert_close(y2, y.detach(), rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(y2, x, v, is_grads_batched=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert install_fused_norms(model) == 2 * N_LAYERS + 1  # idempotent
    assert uninstall_fused_norms(model) == 2 * N_LAYERS + 1 and not norm._raysens_fused
    assert "forward" not in vars(norm)


def test_norm_with_another_formula_is_left_alone():
    class GemmaLikeRMSNorm(torch.nn.Module):  # (1 + w) like Gemma: the fused formula does not apply
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(d), requires_grad=False)
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    m = torch.nn.Sequential(GemmaLikeRMSNorm(8))
    assert install_fused_norms(m) == 0 and "forward" not in vars(m[0])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_engine_with_and_without_fused_norms_agree_and_match_jacrev(kind):
    a, b = make_model(kind), make_model(kind)
    ids = random_ids(8, seed=4)
    A, _ = reference(a, ids, -1)
    # vmap: the autograd path is the one that runs the modules' (fused or not) backward
    ea = SensitivityEngine(a, SensitivityConfig(estimator="exact", fused_norms=True, strategy="vmap"))
    eb = SensitivityEngine(b, SensitivityConfig(estimator="exact", fused_norms=False, strategy="vmap"))
    assert ea.fused_norms == 2 * N_LAYERS + 1 and eb.fused_norms == 0
    va = ea.compute(ids[None]).values[N_LAYERS][0]
    vb = eb.compute(ids[None]).values[N_LAYERS][0]
    assert rel_fro(va, A) <= 1e-5 and rel_fro(vb, A) <= 1e-5
    np.testing.assert_allclose(va, vb, rtol=1e-4, atol=1e-7 * vb.max())
