"""The seed-compatible API (raysens.compat): the older tool's names and result keys, with the
statistic checked against float64 ``torch.func.jacrev`` and the accumulator against numpy."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from refs import random_ids, reference, rel_fro, tiny_model
from raysens.compat import EstablishedAnalysisMethods, WelfordAccumulator

KEYS = {"batch_size", "method", "position_to_position_sensitivity", "position_to_position_std",
        "mean_sensitivity", "std_sensitivity", "per_sample_sensitivities", "target_layer", "lengths"}


def _batch(lengths, seed=0):
    """Right-padded ``[B, S]`` ids and mask with the given lengths."""
    s = max(lengths)
    ids = torch.zeros(len(lengths), s, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = random_ids(n, seed + r)
        mask[r, :n] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_full_jacobian_is_exact_frobenius_against_jacrev(kind):
    model = copy.deepcopy(tiny_model(kind))
    ids, mask = _batch([6, 4])
    r = EstablishedAnalysisMethods(model).compute_position_jacobian(
        ids, target_layer=-1, attention_mask=mask, use_full_jacobian=True, max_seq_len=64)
    assert KEYS <= set(r) and r["batch_size"] == 2 and r["method"].startswith("exact_")
    refs = [reference(tiny_model(kind), ids[b, :n], -1)[0] for b, n in enumerate((6, 4))]
    for got, ref in zip(r["per_sample_sensitivities"], refs):
        assert got.shape == ref.shape and rel_fro(got, ref) < 1e-5
    # the batch mean is over the samples that reach a cell; cells only sample 0 reaches have std NaN
    mean = r["position_to_position_sensitivity"]
    np.testing.assert_allclose(mean[:4, :4], (refs[0][:4, :4] + refs[1]) / 2, rtol=1e-5)
    np.testing.assert_allclose(mean[5, :], refs[0][5, :], rtol=1e-5)
    assert np.isnan(r["position_to_position_std"][5, 5]) and not np.isnan(r["position_to_position_std"][0, 0])


def test_projection_reproduces_the_older_tools_quantity():
    """``estimator="projection"``: ‖uᵀ J_ij‖² with u = 1/√H·1, from the jacrev Jacobian."""
    model = copy.deepcopy(tiny_model("gpt2"))
    ids = random_ids(5, 3)[None]
    r = EstablishedAnalysisMethods(model).compute_position_jacobian(ids, target_layer=2, estimator="projection")
    _, J = reference(tiny_model("gpt2"), ids[0], 2)  # [S, H, S, D]
    u = torch.full((J.shape[1],), 1 / math.sqrt(J.shape[1]), dtype=torch.float64)
    want = torch.einsum("h,ihjd->ijd", u, J).pow(2).sum(-1).numpy()
    assert rel_fro(r["per_sample_sensitivities"][0], want) < 1e-5
    assert rel_fro(want, reference(tiny_model("gpt2"), ids[0], 2)[0]) > 0.1  # and it is not ‖J_ij‖_F²


def test_accumulator_over_batches_equals_numpy_over_all_samples():
    model = copy.deepcopy(tiny_model("llama"))
    an = EstablishedAnalysisMethods(model)
    acc = WelfordAccumulator(device="cpu", dtype=torch.float64)
    per_sample = []
    for seed, lengths in ((0, [5, 3]), (10, [5]), (20, [4, 5, 2])):
        ids, mask = _batch(lengths, seed)
        r = an.compute_position_jacobian(ids, attention_mask=mask, accumulator=acc, probes=2, seed=7)
        per_sample += r["per_sample_sensitivities"]
    st = acc.get_statistics()
    assert st["count"] == 6
    stack = np.full((6, 5, 5), np.nan)
    for b, a in enumerate(per_sample):
        stack[b, :a.shape[0], :a.shape[1]] = a
    n = (~np.isnan(stack)).sum(0)
    np.testing.assert_array_equal(st["cell_count"], n)
    np.testing.assert_allclose(st["mean"], np.nanmean(stack, 0), rtol=1e-12)
    both = n >= 2
    np.testing.assert_allclose(st["var"][both], np.nanvar(stack, 0, ddof=1)[both], rtol=1e-9)
    assert np.isnan(st["var"][~both]).all()
    # what drives a cell: the analyser numbers samples 0, 1, 2, … across calls (docs/DESIGN.md §2.1)
    reached = n > 0
    np.testing.assert_array_equal(st["max"][reached], np.nanmax(stack, 0)[reached])
    np.testing.assert_array_equal(st["max_sample_id"], np.where(reached, np.nanargmax(np.where(reached, stack, 0), 0), -1))
    from raysens.stats.histogram import EPS
    med = np.nanmedian(stack, 0)
    assert (np.abs(st["median"][reached] - med[reached]) <= EPS * med[reached] + 1e-300).all()
    assert {"q25", "q75", "max_share", "row_max_sample_id", "sum"} <= set(st)


def test_each_sample_gets_its_own_probes_across_calls():
    """Two calls with the same ids are two samples (distinct probe seeds), as in the older tool's loop."""
    model = copy.deepcopy(tiny_model("llama"))
    an = EstablishedAnalysisMethods(model)
    ids = random_ids(5, 1)[None]
    a = an.compute_position_jacobian(ids)["per_sample_sensitivities"][0]
    b = an.compute_position_jacobian(ids)["per_sample_sensitivities"][0]
    assert not np.array_equal(a, b)
    again = EstablishedAnalysisMethods(copy.deepcopy(tiny_model("llama"))).compute_position_jacobian(ids)
    np.testing.assert_array_equal(again["per_sample_sensitivities"][0], a)  # reproducible from a fresh start


def test_accumulator_refuses_what_the_older_tool_miscounted():
    acc = WelfordAccumulator()
    with pytest.raises(ValueError, match="batch"):
        acc.update(np.ones((4, 4)))  # [S, S] without a batch axis: the old "count mismatch" bug
    x = np.ones((2, 3, 3))
    x[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN|finite"):
        acc.update(x)
    with pytest.raises(ValueError, match="no data"):
        acc.get_statistics()
    with pytest.raises(TypeError, match="WelfordAccumulator"):
        acc.merge({"mean": 1})


def test_accumulators_merge_like_one_and_grow_with_longer_batches():
    rng = np.random.default_rng(0)
    x1, x2 = rng.random((3, 3, 3)), rng.random((4, 5, 5))
    a, b, one = WelfordAccumulator(), WelfordAccumulator(), WelfordAccumulator()
    a.update(x1)
    b.update(x2)
    one.update(x1)
    one.update(x2)
    merged = a.merge(b).get_statistics()
    ref = one.get_statistics()
    for k in ("mean", "var", "cell_count"):
        np.testing.assert_allclose(merged[k], ref[k], rtol=1e-12, equal_nan=True)
    assert merged["count"] == 7 and merged["cell_count"][4, 4] == 4 and merged["cell_count"][0, 0] == 7


def test_argument_errors_name_the_call():
    an = EstablishedAnalysisMethods(copy.deepcopy(tiny_model("gpt2")))
    ids = random_ids(4, 0)
    with pytest.raises(ValueError, match="compute_position_jacobian: inputs must be \\[B, S\\]"):
        an.compute_position_jacobian(ids)
    with pytest.raises(ValueError, match="compute_norms=False"):
        an.compute_position_jacobian(ids[None], compute_norms=False)
    with pytest.raises(ValueError, match="conflicts"):
        an.compute_position_jacobian(ids[None], use_full_jacobian=True, estimator="hutchinson")
