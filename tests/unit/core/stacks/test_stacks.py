"""The hand-written Llama-family backward (``Strategy.MANUAL``, raysens/manual.py) against float64
``torch.func.jacrev`` and against the autograd ``vmap`` path; when it is and is not used."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as tf

from refs import N_LAYERS, VOCAB, make_model, reference, random_ids, rel_fro, tiny_model
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.stacks import make_stack, unsupported_reason
from raysens.core.stacks.llama import LlamaStack

TOL = 1e-5


def _randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1 if name.endswith("weight") else 0) + 0.3 * torch.randn_like(p))
    return model.eval()


def _mistral(window=None, kv_heads=4):
    cfg = tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS,
                           num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                           sliding_window=window, attn_implementation="eager", initializer_range=0.2,
                           pad_token_id=0)
    torch.manual_seed(0)
    return _randomise(tf.MistralForCausalLM(cfg))


def _batch(lengths, seed=30):
    """Right-padded ``[batch, max(lengths)]`` ids and mask."""
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    am = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = random_ids(n, seed=seed + r)
        am[r, :n] = 1
    return ids, am


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral-mha", "bert", "gpt2"])
def test_manual_exact_matches_jacrev_every_layer_padded_batch(kind):
    model = _mistral() if kind == "mistral-mha" else tiny_model(kind)
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact", strategy="manual", chunk_size=13))
    ids, am = _batch([7, 4, 6])
    layers = list(range(N_LAYERS + 1))
    r = eng.compute(ids, am, layers=layers)
    assert r.strategy == "manual"
    for L in layers:
        for s, n in enumerate([7, 4, 6]):
            A, _ = reference(model, ids[s, :n], L)
            v = r.values[L][s]
            assert rel_fro(v[:n, :n], A) <= TOL, (L, s)
            assert (v[n:] == 0).all() and (v[:, n:] == 0).all()
            if kind != "bert":  # causal: exact zeros above the diagonal; the encoder: both directions
                assert (np.triu(v, 1) == 0).all()
            elif L:
                assert np.triu(v, 1).max() > 0


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("estimator", ["hutchinson", "projection"])
def test_manual_equals_vmap_with_the_same_probes(estimator, kind):
    model = tiny_model(kind)
    cfg = dict(estimator=estimator, num_probes=3, seed=11, mode="reverse")  # the same (reverse) probes
    ids = torch.stack([random_ids(9, seed=1), random_ids(9, seed=2)])
    am = torch.ones_like(ids)
    am[0, :3] = 0  # left padding: the engine re-pads on the right
    out = {s: SensitivityEngine(model, SensitivityConfig(strategy=s, **cfg)).compute(
        ids, am, layers=[1, -1], sample_ids=[4, 9]) for s in ("vmap", "manual")}
    assert out["manual"].strategy == "manual" and out["vmap"].strategy == "vmap"
    for L in (1, N_LAYERS):
        ref = out["vmap"].values[L]
        np.testing.assert_allclose(out["manual"].values[L], ref, rtol=1e-4, atol=1e-7 * ref.max())
        if estimator == "hutchinson":
            ref = out["vmap"].noise[L]
            np.testing.assert_allclose(out["manual"].noise[L], ref, rtol=1e-3, atol=1e-7 * ref.max())


@pytest.mark.parametrize("segments", [1, 3, 9, None])
def test_manual_segments_and_groups_do_not_change_the_numbers(segments):
    model = tiny_model("qwen2")
    ids, am = _batch([9, 5, 8, 9])
    cfg = dict(estimator="hutchinson", num_probes=2, seed=3, strategy="manual")
    ref = SensitivityEngine(model, SensitivityConfig(causal_segments=1, backward_tokens=10**6, **cfg)).compute(
        ids, am, layers=-1).values[N_LAYERS]
    got = SensitivityEngine(model, SensitivityConfig(causal_segments=segments, backward_tokens=20, **cfg)).compute(
        ids, am, layers=-1).values[N_LAYERS]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7 * ref.max())


def _opt():
    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32, attn_implementation="eager")
    return tf.OPTForCausalLM(cfg).eval()


def test_auto_uses_manual_where_a_stack_exists_and_vmap_elsewhere():
    for kind in ("llama", "qwen2", "bert", "gpt2"):
        assert SensitivityEngine(tiny_model(kind)).strategy_used == "manual"
    opt = _opt()
    eng = SensitivityEngine(opt)
    assert eng.strategy_used == "vmap" and eng._manual is None
    assert "model_type 'opt'" in unsupported_reason(opt)
    with pytest.raises(ValueError, match=r"strategy 'manual'.*model_type 'opt'"):
        SensitivityEngine(opt, SensitivityConfig(strategy="manual"))
    with pytest.raises(ValueError, match=r"does not support this model: model_type 'opt'"):
        make_stack(opt)
    ids = random_ids(6, seed=9)
    r = SensitivityEngine(opt, SensitivityConfig(estimator="exact")).compute(ids[None], layers=-1)
    assert rel_fro(r.values[2][0], reference(opt, ids, -1)[0]) <= TOL


def test_a_model_that_fails_the_numerical_check_falls_back_to_vmap():
    model = copy.deepcopy(tiny_model("llama"))
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()  # config still says silu: structure looks right
    with pytest.raises(ValueError, match="numerical check against autograd failed"):
        SensitivityEngine(model, SensitivityConfig(strategy="manual"))
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact"))
    ids = random_ids(6, seed=5)
    r = eng.compute(ids[None], layers=-1)
    assert r.strategy == "vmap"
    A, _ = reference(model, ids, -1)
    assert rel_fro(r.values[N_LAYERS][0], A) <= TOL


def test_sliding_window_shorter_than_the_input_falls_back_per_call():
    model = _mistral(window=4, kv_heads=2)
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact"))
    assert eng._manual is not None and eng._manual.window == 4
    short, long = random_ids(4, seed=6), random_ids(8, seed=7)
    r = eng.compute(short[None], layers=-1)
    assert r.strategy == "manual"
    assert rel_fro(r.values[N_LAYERS][0], reference(model, short, -1)[0]) <= TOL
    r = eng.compute(long[None], layers=[1, -1])  # the window cuts attention: autograd through HF's modules
    assert r.strategy == "vmap"
    for L in (1, N_LAYERS):
        assert rel_fro(r.values[L][0], reference(model, long, L)[0]) <= TOL
    one_block = r.values[1][0]
    assert (one_block[7, :4] == 0).all() and (one_block[7, 4:] > 0).all()  # the window is in effect


def test_vjp_consumes_only_the_requested_rows_and_prefix():
    """A segment uses the prefix [0, b) of a full-length forward: same VJP as a forward on the prefix."""
    model = make_model("llama", seed=3)
    stack = LlamaStack(model)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 8, 32, generator=g)
    mask = torch.ones(3, 8, dtype=torch.long)
    full = stack.forward(emb, mask, N_LAYERS)
    cot = torch.randn(2, 2, 5, 32, generator=g)
    got = stack.vjp(full, 2, cot.clone(), slice(1, 3))
    want = stack.vjp(stack.forward(emb[1:3, :5], mask[1:3, :5], N_LAYERS), 2, cot.clone(), slice(0, 2))
    # float32 sums over 8 vs 5 positions round differently (CPU-kernel dependent): the tolerance is
    # relative to the cotangents' scale, not to each element (small entries are sums that cancel)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-6 * float(want.abs().max()))  # seen: 7.5e-7 of the max


@pytest.mark.parametrize("kind,b", [("bert", 6), ("llama", 6), ("llama", 4)])
def test_top_block_on_one_position_equals_the_dense_backward(kind, b):
    """Rows nonzero at one position each: the position-wise top block gives the dense result
    (Llama: also on a prefix b < S of the shared forward)."""
    model = make_model(kind, seed=4)
    stack = make_stack(model)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(3, 6, 32, generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    fwd = stack.forward(emb, mask, N_LAYERS)
    pos = torch.tensor([0, b - 1, 2, 2, 3])
    cot = torch.zeros(5, 3, b, 32)
    cot[torch.arange(5), :, pos] = torch.randn(5, 3, 32, generator=g)
    for L in (1, 2, N_LAYERS):
        dense = stack.vjp(fwd, L, cot.clone(), slice(0, 3))
        sparse = stack.vjp(fwd, L, cot.clone(), slice(0, 3), pos)
        tol = dict(rtol=1e-4, atol=1e-6 * float(dense.abs().max()))  # float32 sums in another order
        torch.testing.assert_close(sparse, dense, **tol)
        rows = stack.vjp(fwd, L, cot[:, 1:].clone(), slice(1, 3), pos)  # a sample group of the forward
        torch.testing.assert_close(rows, dense[:, 1:], **tol)


def test_bert_with_another_activation_is_not_manual():
    cfg = copy.deepcopy(tiny_model("bert").config)
    cfg.hidden_act = "relu"
    model = tf.BertModel(cfg).eval()
    assert "hidden_act" in unsupported_reason(model)
    assert SensitivityEngine(model).strategy_used == "vmap"


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_shared_forwards_follow_the_memory_budget_without_changing_numbers(kind, monkeypatch):
    model = tiny_model(kind)
    ids, am = _batch([7, 4, 6, 7, 5], seed=60)
    cfg = SensitivityConfig(estimator="hutchinson", num_probes=2, seed=2)
    ref = SensitivityEngine(model, cfg).compute(ids, am, layers=[1, -1])
    eng = SensitivityEngine(model, cfg)
    per_sample = eng._manual.saved_bytes(7, N_LAYERS)
    assert per_sample > 0
    monkeypatch.setattr(eng.memory, "budget_bytes", lambda: 2 * per_sample)  # two samples per forward
    assert eng.memory.forward_groups(5, per_sample) == [(0, 2), (2, 4), (4, 5)]
    groups, forward_groups = [], eng.memory.forward_groups
    monkeypatch.setattr(eng.memory, "forward_groups", lambda *a: groups.append(forward_groups(*a)) or groups[-1])
    got = eng.compute(ids, am, layers=[1, -1])
    assert groups == [[(0, 2), (2, 4), (4, 5)]]  # compute asks with the batch's per-sample bytes
    for L in (1, N_LAYERS):
        np.testing.assert_allclose(got.values[L], ref.values[L], rtol=1e-5, atol=1e-8 * ref.values[L].max())
        np.testing.assert_allclose(got.noise[L], ref.noise[L], rtol=1e-4, atol=1e-8 * ref.noise[L].max())


def test_gpt2_activation_derivative_follows_the_configured_activation():
    """GPT-2's stack differentiates whatever elementwise activation the block uses (here ReLU)."""
    model = make_model("gpt2", seed=2)
    for blk in model.transformer.h:
        blk.mlp.act = torch.nn.ReLU()
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact", strategy="manual"))
    ids = random_ids(6, seed=12)
    r = eng.compute(ids[None], layers=-1)
    assert rel_fro(r.values[N_LAYERS][0], reference(model, ids, -1)[0]) <= TOL


@pytest.mark.parametrize("kind,strategy", [("llama", "manual"), ("bert", "manual"), ("gpt2", "manual"),
                                           ("gpt2", "vmap"), ("llama", "loop")])
def test_numbers_do_not_depend_on_the_thread_count(kind, strategy):
    """Ray actors and the in-process path run with different torch thread counts and must give the
    same statistics (docs/DESIGN.md §1.9, §5): tiny GEMMs (top block, 1-sample segments, a lone short sample's
    forward) are padded (manual.mm, autograd_paths.pad_batch)."""
    model = tiny_model(kind)
    eng = SensitivityEngine(model, SensitivityConfig(num_probes=2, seed=4, strategy=strategy))
    before = torch.get_num_threads()
    try:
        for ids, am in (_batch([9, 5, 8], seed=70), _batch([5], seed=71)):
            out = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                out[threads] = eng.compute(ids, am, layers=[1, -1])
            assert out[1].strategy == strategy
            for L in out[1].layers:
                np.testing.assert_array_equal(out[1].values[L], out[2].values[L])
                np.testing.assert_array_equal(out[1].noise[L], out[2].noise[L])
    finally:
        torch.set_num_threads(before)


def test_import_makes_gemms_thread_count_independent():
    """``import raysens`` sets MKL's strict reproducibility before any product (DESIGN §1.9): GEMMs
    that MKL splits along their inner dimension (on an AVX-512 Xeon: 32-192 rows × 1536) give the same
    bits at 1 and 2 threads; a user's own MKL_CBWR is kept."""
    import os
    import subprocess
    import sys

    code = ("import raysens, os, torch\n"
            "from raysens.core.stacks.gemm import check_gemm_threads\n"
            "g = torch.Generator().manual_seed(1)\n"
            "ok = check_gemm_threads()\n"
            "for m in (32, 64, 128, 192):\n"
            "    a, b = torch.randn(m, 1536, generator=g), torch.randn(1536, 384, generator=g)\n"
            "    outs = []\n"
            "    for t in (1, 2):\n"
            "        torch.set_num_threads(t); outs.append(a @ b)\n"
            "    ok = ok and torch.equal(*outs)\n"
            "print(os.environ['MKL_CBWR'], ok)\n")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["AUTO,STRICT", "True"]
    out = subprocess.run([sys.executable, "-c", "import raysens, os; print(os.environ['MKL_CBWR'])"],
                         env={**env, "MKL_CBWR": "COMPATIBLE"}, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "COMPATIBLE"
