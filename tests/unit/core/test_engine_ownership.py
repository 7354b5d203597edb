"""The engine never changes the caller's model (docs/DESIGN.md §5): parameters' flags and dtypes,
module forwards, the attention implementation, ``training``, a forward's outputs and a
``torch.func.jvp`` through the caller's model are the same before and after an engine ran on it;
float32 weights are shared, not duplicated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import _config, random_ids
from raysens.compat import EstablishedAnalysisMethods
from raysens.core.engine import SensitivityConfig, SensitivityEngine


def _user_model(dtype=torch.float32):
    cls, cfg = _config("llama")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = cls(cfg).to(dtype)
    m.train()  # a user in the middle of fine-tuning
    return m


def _snapshot(m):
    ids = random_ids(6, seed=3)[None]
    was = m.training
    m.eval()
    with torch.no_grad():
        emb = m.get_input_embeddings()(ids)
        out = m(inputs_embeds=emb).logits.float().clone()
    tangent = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)).to(emb.dtype)
    # the math SDPA kernel has forward AD (the fused CPU kernel does not)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        _, jvp = torch.func.jvp(lambda e: m(inputs_embeds=e).logits, (emb,), (tangent,))
    m.train(was)
    return {
        "flags": {n: (p.requires_grad, p.dtype, p.device) for n, p in m.named_parameters()},
        "forwards": {n: ("forward" in vars(mod), getattr(mod, "_raysens_fused", None)) for n, mod in m.named_modules()},
        "attn": m.config._attn_implementation,
        "training": m.training,
        "out": out, "jvp": jvp.float().clone(),
    }


def _same(a, b):
    assert a["flags"] == b["flags"] and a["forwards"] == b["forwards"]
    assert a["attn"] == b["attn"] == "sdpa" and a["training"] == b["training"] is True
    assert torch.equal(a["out"], b["out"]) and torch.equal(a["jvp"], b["jvp"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_engine_leaves_the_callers_model_alone(dtype, mode):
    m = _user_model(dtype)
    before = _snapshot(m)
    try:
        cfg = SensitivityConfig(estimator="hutchinson", mode=mode)
    except TypeError:  # before the mode option existed
        cfg = SensitivityConfig(estimator="hutchinson")
    eng = SensitivityEngine(m, cfg)
    assert eng.fused_norms > 0  # the engine's own modules did get fused norms
    eng.compute(random_ids(6, seed=2)[None], layers=[1, -1])
    _same(before, _snapshot(m))
    assert all(p.requires_grad for p in m.parameters())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in eng.model.parameters())
    assert eng.model.config._attn_implementation == "eager"


def test_float32_weights_are_shared_not_copied():
    m = _user_model()
    eng = SensitivityEngine(m, SensitivityConfig())
    mine = dict(eng.model.named_parameters())
    for name, p in m.named_parameters():
        assert mine[name].data_ptr() == p.data_ptr(), name
    # tied weights stay tied, and an edit of the caller's weights is seen by the engine
    assert eng.model.lm_head.weight is eng.model.get_input_embeddings().weight or \
        eng.model.lm_head.weight.data_ptr() != eng.model.get_input_embeddings().weight.data_ptr() and \
        m.lm_head.weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        m.model.norm.weight.mul_(2)
    assert torch.equal(eng.model.model.norm.weight, m.model.norm.weight)


def test_bf16_model_gets_a_float32_copy():
    m = _user_model(torch.bfloat16)
    eng = SensitivityEngine(m, SensitivityConfig())
    for (name, p), q in zip(m.named_parameters(), eng.model.parameters()):
        assert p.dtype == torch.bfloat16 and q.dtype == torch.float32
        assert torch.equal(p.float(), q), name


def test_compat_api_leaves_the_callers_model_alone():
    m = _user_model()
    before = _snapshot(m)
    api = EstablishedAnalysisMethods(m)
    out = api.compute_position_jacobian(random_ids(5, seed=1)[None], target_layer=-1, max_seq_len=5)
    assert np.isfinite(out["position_to_position_sensitivity"][0, 0])
    _same(before, _snapshot(m))
