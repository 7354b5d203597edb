"""Packed causal tangent rows (``raysens/core/stacks/packing.py``, ``passes/packed.py``): the pack's indices against loops
written out, the packed JVP of several suffixes (padded attention groups) against ``torch.func.jvp``
through the model's own modules, and a packed run against the suffix-segment run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import N_LAYERS, padded, random_ids, tiny_model
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.passes.fused import plain_norms
from raysens.core.passes.packed import accumulate_packed
from raysens.core.stacks import packing
from raysens.core.stacks.packing import Pack

PIECES = [(0, 2), (1, 1), (3, 2), (3, 1), (5, 1), (6, 2)]  # (input position, tangent rows)


def _rows(pieces, batch, seq):
    """(piece, tangent row, sample, suffix position) of every packed row, in pack order (written out)."""
    return [(k, c, b, j + p) for k, (j, n) in enumerate(pieces) for c in range(n) for b in range(batch)
            for p in range(seq - j)]


def test_pack_indices_match_the_rows_written_out():
    batch, seq = 3, 8
    pack = Pack(PIECES, batch, seq, torch.device("cpu"), b0=1)
    rows = _rows(PIECES, batch, seq)
    assert pack.rows_total == len(rows)
    assert pack.gather.tolist() == [(1 + b) * seq + t for _, _, b, t in rows]
    assert pack.out_index.tolist() == [b * seq * seq + t * seq + PIECES[k][0] for k, _, b, t in rows]
    seeds = [r for r, (k, _, _, t) in enumerate(rows) if t == PIECES[k][0]]
    assert sorted(pack.seed.tolist()) == seeds and len(pack.seed) == len(seeds)
    bs, js = pack.seed_rows()
    assert [(rows[r][2], PIECES[rows[r][0]][0]) for r in pack.seed.tolist()] == list(zip(bs.tolist(), js.tolist()))
    t = torch.randn(5, seq, 4, 2)  # [batch', S, ...]: the pack reads samples 1..3
    np.testing.assert_array_equal(pack.saved(t).numpy(), np.stack([t[1 + b, p].numpy() for _, _, b, p in rows]))
    y = torch.arange(pack.rows_total * 2.0).view(-1, 2)
    views = pack.unpack(y)
    assert [tuple(v.shape) for v in views] == [(n, batch, seq - j, 2) for j, n in PIECES]
    assert torch.equal(torch.cat([v.reshape(-1, 2) for v in views]), y)


def test_attention_groups_pad_within_the_bound_and_map_back():
    batch, seq = 2, 8
    pack = Pack(PIECES, batch, seq, torch.device("cpu"))
    assert pack.groups[0].r0 == 0 and pack.groups[-1].r1 == pack.rows_total
    assert all(g.r1 == h.r0 for g, h in zip(pack.groups, pack.groups[1:]))
    rows = _rows(PIECES, batch, seq)
    for g in pack.groups:
        mine = rows[g.r0:g.r1]
        real = g.r1 - g.r0
        width = seq - g.a
        assert g.rows * batch * width <= (1 + packing.MAX_WASTE) * real
        assert min(PIECES[k][0] for k, *_ in mine) == g.a
        if g.idx is None:
            assert all(PIECES[k][0] == g.a for k, *_ in mine)
            continue
        # the padded block [rows, batch, S − a]: row c of the group, sample b, position t − a
        first = {}
        for k, c, b, t in mine:
            first.setdefault((k, c), len(first))
        want = [(first[(k, c)] * batch + b) * width + (t - g.a) for k, c, b, t in mine]
        assert g.idx.tolist() == want
    assert len(pack.groups) > 1  # PIECES needs several groups at this bound


def test_accumulate_adds_squared_norms_where_the_loops_put_them():
    batch, seq = 2, 6
    pieces = [(0, 2), (2, 1), (2, 2), (4, 1)]
    pack = Pack(pieces, batch, seq, torch.device("cpu"))
    y = torch.randn(pack.rows_total, 5)
    total, sumsq = torch.zeros(batch, seq, seq, dtype=torch.float64), torch.zeros(batch, seq, seq, dtype=torch.float64)
    accumulate_packed(pack, y, total, sumsq)
    want_t, want_s = np.zeros((batch, seq, seq)), np.zeros((batch, seq, seq))
    for r, (k, _, b, t) in enumerate(_rows(pieces, batch, seq)):
        sq = float(y[r].pow(2).sum())
        want_t[b, t, pieces[k][0]] += sq
        want_s[b, t, pieces[k][0]] += sq * sq
    np.testing.assert_allclose(total.numpy(), want_t, rtol=1e-12)
    np.testing.assert_allclose(sumsq.numpy(), want_s, rtol=1e-12)
    strided = torch.zeros(seq, seq, batch, dtype=torch.float64).permute(2, 0, 1)  # a view that is not contiguous
    accumulate_packed(pack, y, strided, None)
    np.testing.assert_allclose(strided.numpy(), want_t, rtol=1e-12)


def test_pieces_out_of_order_are_refused():
    with pytest.raises(ValueError, match="non-decreasing"):
        Pack([(3, 1), (1, 1)], 1, 4, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_jvp_matches_torch_jvp_through_the_model(kind):
    """Several suffixes in one pack (several padded attention groups, rows of one position split over
    pieces, a right-padded sample): each piece's tangents equal ``torch.func.jvp`` through the
    model's own modules at every layer."""
    model = tiny_model(kind)
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact", mode="forward", strategy="manual"))
    stack = eng._manual
    seq, d = 8, int(model.config.hidden_size)
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(2, seq, d, generator=gen)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, 6:] = 0
    layers = list(range(N_LAYERS + 1))
    fwd = stack.forward(emb, mask, N_LAYERS)
    ts = []
    for j, n in PIECES:
        t = torch.zeros(n, 2, seq, d)
        t[:, :, j:] = torch.randn(n, 2, seq - j, d, generator=gen)
        ts.append(t)
    pack = Pack(PIECES, 2, seq, emb.device)
    assert len(pack.groups) > 1 and any(g.idx is not None for g in pack.groups)
    got = stack.jvp_packed(fwd, layers, torch.cat([t[:, :, j:].reshape(-1, d) for t, (j, _) in zip(ts, PIECES)]), pack)
    for k, (t, (j, _)) in enumerate(zip(ts, PIECES)):
        with torch.no_grad(), plain_norms():
            want = torch.func.vmap(lambda u: torch.func.jvp(lambda e: eng._autograd.forward(e, mask, layers),
                                                            (emb,), (u,))[1])(t)
        for L in layers:
            w = want[L][:, :, j:]
            g = pack.unpack(got[L])[k]
            assert float((g - w).norm() / w.norm()) <= 1e-5, (kind, j, L)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_run_equals_the_suffix_segment_run(kind):
    """The engine's packed forward pass and its suffix segments (``ManualForward.packing = False``)
    give the same sums and within-sample probe variance (K=2) up to float32 rounding."""
    model = tiny_model(kind)
    ids, am = padded([random_ids(n, seed=s) for s, n in enumerate([9, 6, 8])], "right")
    layers = [1, N_LAYERS]
    res = {}
    for packed in (True, False):
        eng = SensitivityEngine(model, SensitivityConfig(num_probes=2, mode="forward", strategy="manual", seed=5))
        eng._manual_fwd.packing = packed
        res[packed] = eng.compute(ids, am, layers=layers)
        assert res[packed].strategy == "manual"
    for L in layers:
        scale = res[False].values[L].max()
        np.testing.assert_allclose(res[True].values[L], res[False].values[L], rtol=1e-5, atol=1e-7 * scale)
        np.testing.assert_allclose(res[True].noise[L], res[False].noise[L], rtol=1e-4, atol=1e-6 * res[False].noise[L].max())
