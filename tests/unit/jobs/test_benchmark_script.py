"""The benchmark script must keep running: its GPU mode's code path on a tiny model on the CPU, and
its seed-loop re-implementation against raysens' ``projection`` estimator (same quantity)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import make_model, random_ids

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "jobs"))

import benchmark  # noqa: E402
from raysens.core.engine import SensitivityConfig, SensitivityEngine  # noqa: E402


def test_seed_loop_equals_projection_estimator():
    model = make_model("llama").eval()
    seed_m = benchmark.seed_model_copy(model)
    ids = torch.stack([random_ids(7, seed=1), random_ids(7, seed=2)])
    am = torch.ones_like(ids)
    maps = benchmark.seed_loop(seed_m, ids, am, -1)  # bf16 weights, fp32 compute, as the seed did
    ref = SensitivityEngine(seed_m.float(), SensitivityConfig(estimator="projection")).compute(ids, am, layers=-1)
    L = ref.layers[0]
    for r in range(2):
        np.testing.assert_allclose(maps[r], ref.values[L][r], rtol=1e-4, atol=1e-6 * ref.values[L][r].max())


def test_gpu_mode_runs_on_cpu_tiny(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), "gpu", "--device", "cpu", "--tiny",
                          "--reps", "1", "--seed-samples", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "benchmark_gpu.json").read_text())
    assert res["segments"][0][0] == 0 and res["segments"][-1][1] == res["seq_len"]
    # the default strategy is checked against vmap on the benchmark input before it is timed
    assert res["strategy_check"]["strategy"] == "manual" and res["strategy_check"]["rel_fro_vs_vmap"] < 1e-4
    assert res["fp32"]["strategy"] == "manual"
    for tag in ("fp32", "tf32"):
        assert res[tag]["s_per_sample"] > 0
        assert abs(res["ratio_" + tag] - res["seed"]["s_per_sample"] / res[tag]["s_per_sample"]) < 1e-9
    assert "raysens fp32" in out.stdout


def test_strategies_mode_times_manual_and_vmap(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), "strategies", "--models", "gpt2",
                          "--samples", "2", "--batch", "2", "--seq-len", "8", "--rounds", "1", "--threads", "1",
                          "--layers", "-1", "99", "--json", str(tmp_path / "s.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "s.json").read_text())
    assert [r["layer"] for r in res] == [-1]  # layer 99 does not exist in GPT-2 small: skipped, said so
    assert "skipped" in out.stdout + out.stderr
    r = res[0]
    assert r["speedup_median"] > 0 and len(r["s_per_sample"]["vmap"]) == len(r["s_per_sample"]["manual"]) == 1
    assert r["segments"]["manual"] >= r["segments"]["vmap"] >= 1


def test_gpu_mode_times_vmap_when_the_default_strategy_fails_its_check(monkeypatch):
    model = make_model("llama")
    ids = torch.stack([random_ids(6, seed=1), random_ids(6, seed=2)])
    am = torch.ones_like(ids)
    engine = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1))
    assert engine.strategy_used == "manual"
    info = {}
    assert benchmark._checked_strategy(engine, model, ids, am, "cpu", 1000, info) is engine
    assert info["strategy_check"]["rel_fro_vs_vmap"] < 1e-4

    def broken(*a, **k):
        raise RuntimeError("no kernel for this op")

    monkeypatch.setattr(engine, "compute", broken)
    info = {}
    timed = benchmark._checked_strategy(engine, model, ids, am, "cpu", 1000, info)
    assert timed is not engine and timed.strategy_used == "vmap"
    assert "raised RuntimeError: no kernel for this op" in info["strategy_check"]["failed"]
