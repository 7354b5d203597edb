"""The planner's pilot and the engine that runs a plan (raysens/core/planning/pilot.py and planned.py, docs/DESIGN.md §1.11),
against float64 ``torch.func.jacrev`` references: a mixed-mode plan gives each layer its own mode's
and K's estimates (unbiased, with that K's noise), the pilot's probe variances match the Rademacher
variance formula on the exact Jacobian, and configs without planning keep their dict (fingerprint)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from refs import random_ids, reference, tiny_model
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.planning.pilot import PilotSamples, run_pilot
from raysens.core.planning.planned import PlannedEngine

PLAN = ("1:forward:2", "2:forward:2", "3:reverse:4")
N_REP = 160  # replicates of one sample (distinct sample_ids: independent probes)


@pytest.fixture(scope="module")
def planned():
    model = tiny_model("llama")
    ids = random_ids(6, seed=5)
    batch = ids[None].repeat(N_REP, 1)
    sids = list(range(2000, 2000 + N_REP))
    res = PlannedEngine(model, SensitivityConfig(layer_plan=PLAN, seed=7)).compute(batch, layers=[1, 2, 3],
                                                                                sample_ids=sids)
    return model, ids, batch, sids, res


def test_each_layer_is_its_own_modes_run(planned):
    """Layer by layer the planned numbers are those of an explicit run with that mode and K."""
    model, _, batch, sids, res = planned
    assert res.layers == (1, 2, 3) and res.mode == "forward+reverse" and res.num_probes == 4
    for L, (mode, k) in {1: ("forward", 2), 2: ("forward", 2), 3: ("reverse", 4)}.items():
        alone = SensitivityEngine(model, SensitivityConfig(mode=mode, num_probes=k, seed=7)).compute(
            batch, layers=[L], sample_ids=sids)
        assert alone.mode == mode
        np.testing.assert_allclose(res.values[L], alone.values[L], rtol=1e-5, atol=1e-7, err_msg=f"layer {L}")
        np.testing.assert_allclose(res.noise[L], alone.noise[L], rtol=1e-5, atol=1e-9, err_msg=f"layer {L}")


def _single_probe_var(J: np.ndarray, mode: str) -> np.ndarray:
    """Rademacher variance of one probe's term per cell: 2(‖M‖_F² − Σ_d M_dd²), M = J_ijᵀJ_ij (forward,
    input-side probes) or J_ij J_ijᵀ (reverse, output-side). ``J``: [S, H, S, D] float64."""
    S = J.shape[0]
    out = np.zeros((S, S))
    for i in range(S):
        for j in range(S):
            b = J[i, :, j, :]
            M = b.T @ b if mode == "forward" else b @ b.T
            out[i, j] = 2 * ((M ** 2).sum() - (np.diag(M) ** 2).sum())
    return out


def test_planned_layers_are_unbiased_with_their_own_k_noise(planned):
    """Mean over replicates → jacrev A (z-test); the spread of one layer's estimates is its own mode's
    single-probe variance / its own K (the Rademacher formula on the exact Jacobian)."""
    model, ids, _, _, res = planned
    for L, (mode, k) in {1: ("forward", 2), 2: ("forward", 2), 3: ("reverse", 4)}.items():
        A, J = reference(model, ids, L)
        sel = A > 1e-12 * A.max()
        v = res.values[L].astype(np.float64)
        z = (v.mean(0) - A)[sel] / (v.std(0, ddof=1)[sel] / math.sqrt(N_REP))
        assert np.abs(z).max() < 5.5, (L, np.abs(z).max())
        want = _single_probe_var(J.numpy(), mode)[sel] / k
        ratio = v.var(0, ddof=1)[sel] / want
        assert np.median(ratio) == pytest.approx(1.0, abs=0.2), (L, np.median(ratio))
        # the engine's per-sample noise (σ²/K from the K probes) says the same
        assert np.median(res.noise[L].mean(0)[sel] / want) == pytest.approx(1.0, abs=0.2)


def test_k1_layers_have_no_noise_and_bad_layers_are_refused():
    model = tiny_model("llama")
    ids = random_ids(5, seed=2)[None].repeat(3, 1)
    eng = PlannedEngine(model, SensitivityConfig(layer_plan=("1:reverse:1", "3:forward:3")))
    res = eng.compute(ids, layers=[1, 3], sample_ids=[0, 1, 2])
    assert set(res.noise) == {3} and res.values[1].shape == (3, 5, 5)
    with pytest.raises(ValueError, match="PlannedEngine.compute: layers"):
        eng.compute(ids, layers=[1, 2], sample_ids=[0, 1, 2])


def test_pilot_measures_each_modes_probe_variance():
    """One sample replicated: no variation across samples, the cell mean is A and each mode's
    single-probe variance is the Rademacher formula on jacrev's J (the pilot's medians)."""
    model = tiny_model("llama")
    ids = random_ids(6, seed=9)
    rows = [ids.tolist()] * 120
    cfg = SensitivityConfig(budget=2.0, seed=3)
    plan = run_pilot(model, cfg, PilotSamples(rows, list(range(120)), 6), [1, 3], n=100)
    for L in (1, 3):
        A, J = reference(model, ids, L)
        sel = A > 1e-12 * A.max()
        s = plan["layers"][str(L)]
        assert s["cells"] == int(sel.sum())
        for mode in ("forward", "reverse"):
            want = float(np.median(np.sqrt(_single_probe_var(J.numpy(), mode)[sel]) / A[sel]))
            assert s[f"rel_sd_probe_{mode}"] == pytest.approx(want, rel=0.15), (L, mode)
        # no data variation here; what is left is the error of var − noise over 120 samples (clamped at 0)
        assert s["rel_sd_data"] ** 2 < 0.1 * min(s["rel_sd_probe_forward"], s["rel_sd_probe_reverse"]) ** 2
    again = run_pilot(model, cfg, PilotSamples(rows, list(range(120)), 6), [1, 3], n=100)
    assert json.dumps(plan, sort_keys=True) == json.dumps(again, sort_keys=True)  # deterministic
    assert plan["pilot"]["probes"] == 2 and plan["cost"]["relative_to_auto_k1"] <= 2.0 + 1e-9


PRE_ISSUE_KEYS = {"estimator", "num_probes", "probe_distribution", "strategy", "memory_budget_mb", "chunk_size",
                  "causal_segments", "fused_norms", "backward_tokens", "seed", "mode",
                  "precision"}  # precision (issue 20) is always in the fingerprint, planning keys only when used


def test_configs_without_planning_keep_their_dict():
    """Explicit mode/num_probes: the dict (hence the run fingerprint) has no planning keys."""
    for cfg in (SensitivityConfig(), SensitivityConfig(mode="forward", num_probes=4),
                SensitivityConfig(estimator="exact", mode="reverse")):
        d = cfg.to_dict()
        assert set(d) == PRE_ISSUE_KEYS
        assert SensitivityConfig.from_dict(d) == cfg
    d = SensitivityConfig(budget=2.0, max_probes=8).to_dict()
    assert d["budget"] == 2.0 and d["max_probes"] == 8 and "target_rel_se" not in d


@pytest.mark.parametrize("kw, msg", [
    (dict(budget=2.0, target_rel_se=0.1), "not both"),
    (dict(budget=2.0, mode="forward"), "leave mode 'auto'"),
    (dict(budget=-1.0), "budget must be a positive number"),
    (dict(target_rel_se=0.1, estimator="exact"), "needs estimator 'hutchinson'"),
    (dict(budget=2.0, pilot_samples=1), "pilot_samples must be >= 2"),
    (dict(budget=2.0, num_probes=4, max_probes=2), "max_probes"),
    (dict(layer_plan=("1:forward:2", "2:forward:3")), "share one K"),
    (dict(layer_plan=("1:sideways:2",)), "is not 'layer:mode:K'"),
    (dict(layer_plan=("1:reverse:2", "1:forward:2")), "twice"),
])
def test_planning_fields_are_validated(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SensitivityConfig(**kw)
