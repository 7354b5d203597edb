"""The engine's public hooks for benchmarks: ``hidden_states`` (the differentiated function) against
the model's own ``output_hidden_states=True`` forward and the engine's exact result, and
``chunks_used`` (every chunk-size decision of the last ``compute`` call)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import HIDDEN, N_LAYERS, make_model, random_ids, rel_fro, tiny_model
from raysens.core.engine import SensitivityConfig, SensitivityEngine


def _batch(lengths, seed):
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    am = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = random_ids(n, seed=seed + r)
        am[r, :n] = 1
    return ids, am


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert"])
def test_hidden_states_are_the_models_own(kind):
    eng = SensitivityEngine(tiny_model(kind))
    ids, am = _batch([6, 4, 6], seed=80)  # one right-padded sample
    with torch.no_grad():
        emb = eng.model.get_input_embeddings()(ids)  # [batch, S, d_model]
        want = eng.base(inputs_embeds=emb, attention_mask=am, output_hidden_states=True, use_cache=False).hidden_states
        got = eng.hidden_states(emb, am, [0, 1, -1])
    assert sorted(got) == [0, 1, N_LAYERS]  # absolute indices
    for L, h in got.items():
        assert h.shape == (3, 6, HIDDEN)
        torch.testing.assert_close(h, want[L], rtol=0, atol=0)  # the same modules and inputs: bit-equal
    # an unprepared copy of the model (no fused norms): the same function up to float32 rounding
    fresh = make_model(kind)
    with torch.no_grad():
        plain = fresh.base_model(inputs_embeds=emb, attention_mask=am, output_hidden_states=True, use_cache=False)
    for L, h in got.items():
        torch.testing.assert_close(h, plain.hidden_states[L], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # no mask: every token real
        full = eng.base(inputs_embeds=emb, output_hidden_states=True, use_cache=False).hidden_states
        torch.testing.assert_close(eng.hidden_states(emb, None, 1)[1], full[1], rtol=0, atol=0)


def test_hidden_states_stop_after_the_deepest_target_layer():
    eng = SensitivityEngine(tiny_model("llama"))
    ran = []
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, blk in enumerate(eng.blocks)]
    try:
        emb = torch.randn(1, 5, HIDDEN)
        out = eng.hidden_states(emb, torch.ones(1, 5, dtype=torch.long), 2)
    finally:
        for h in handles:
            h.remove()
    assert list(out) == [2] and ran == [0, 1]  # block 2's input is hidden_states[2]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_jacrev_of_hidden_states_gives_the_exact_sensitivities(kind):
    eng = SensitivityEngine(tiny_model(kind), SensitivityConfig(estimator="exact"))
    ids = random_ids(5, seed=81)
    am = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        emb = eng.model.get_input_embeddings()(ids[None])[0]  # [S, d_model]
    J = torch.func.jacrev(lambda e: eng.hidden_states(e[None], am, -1)[N_LAYERS][0])(emb)  # [S, H, S, D]
    A = (J.double() ** 2).sum(dim=(1, 3)).numpy()
    r = eng.compute(ids[None], layers=-1)
    assert rel_fro(r.values[N_LAYERS][0], A) <= 1e-5


@pytest.mark.parametrize("strategy", ["vmap", "loop", "replicate", "manual"])
def test_chunks_used_records_every_decision_of_the_last_call(strategy):
    cfg = SensitivityConfig(estimator="hutchinson", num_probes=2, strategy=strategy, backward_tokens=10**6,
                            mode="reverse")  # the reverse segments' chunk decisions
    eng = SensitivityEngine(tiny_model("llama"), cfg)
    assert eng.chunks_used == []
    ids = random_ids(9, seed=82)
    eng.compute(ids[None], layers=[1, -1])
    first = eng.chunks_used
    # one decision per segment (one sample: one group), for that segment's rows of one layer
    assert [n for n, _, _ in first] == [(b - a) * 2 for a, b in eng.segments_for(9)]
    assert all(1 <= c <= n and per_row > 0 for n, c, per_row in first)
    eng.compute(ids[None, :4], layers=-1)  # reset per call: only the new call's decisions
    assert [n for n, _, _ in eng.chunks_used] == [(b - a) * 2 for a, b in eng.segments_for(4)]
    assert eng.chunks_used is not first and [n for n, _, _ in first] == [(b - a) * 2 for a, b in eng.segments_for(9)]


def test_chunks_used_follows_sample_groups_and_the_budget():
    ids, am = _batch([7, 4, 6], seed=83)
    eng = SensitivityEngine(tiny_model("bert"), SensitivityConfig(estimator="exact", backward_tokens=8 * HIDDEN * 7,
                                                                  memory_budget_mb=1))
    eng.compute(ids, am, layers=-1)
    groups = eng.schedule.groups(3, 7, 7)  # bert: one segment [0, 7)
    assert len(groups) > 1 and len(eng.chunks_used) == len(groups)
    for n, c, per_row in eng.chunks_used:
        assert n == 7 * HIDDEN and c == max(1, min(n, (1 << 20) // per_row))


@pytest.mark.parametrize("strategy", ["vmap", "replicate", "manual"])
def test_chunks_used_respects_an_explicit_chunk_size(strategy):
    ids, am = _batch([7, 4], seed=84)
    eng = SensitivityEngine(tiny_model("gpt2"), SensitivityConfig(estimator="exact", chunk_size=5, strategy=strategy))
    r = eng.compute(ids, am, layers=[1, -1])
    assert eng.chunks_used and all(c == min(n, 5) for n, c, _ in eng.chunks_used)
    assert any(n > 5 for n, _, _ in eng.chunks_used)
    ref = SensitivityEngine(tiny_model("gpt2"), SensitivityConfig(estimator="exact", strategy=strategy)).compute(
        ids, am, layers=[1, -1])
    for L in r.layers:
        np.testing.assert_allclose(r.values[L], ref.values[L], rtol=1e-4, atol=1e-7 * ref.values[L].max())
