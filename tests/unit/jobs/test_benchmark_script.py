"""The benchmarks in ``jobs/bench/`` must keep running: the GPU mode's code path on a tiny model on
the CPU, the strategies mode, and the seed-loop re-implementation against raysens' ``projection``
estimator (same quantity). ``jobs`` is a package imported from the repository root (the working
directory of ``python -m pytest`` / ``make test``); the scripts run as ``python -m jobs.bench.benchmark``
with the repository root as their working directory, as a person launches them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from refs import make_model, random_ids

from jobs.bench import common, cpu, gpu
from raysens.core.engine import SensitivityConfig, SensitivityEngine

ROOT = Path(__file__).resolve().parents[3]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.bench.benchmark", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_seed_loop_equals_projection_estimator():
    model = make_model("llama").eval()
    seed_m = common.seed_model_copy(model)
    ids = torch.stack([random_ids(7, seed=1), random_ids(7, seed=2)])
    am = torch.ones_like(ids)
    maps = common.seed_loop(seed_m, ids, am, -1)  # bf16 weights, fp32 compute, as the seed did
    ref = SensitivityEngine(seed_m.float(), SensitivityConfig(estimator="projection")).compute(ids, am, layers=-1)
    L = ref.layers[0]
    for r in range(2):
        np.testing.assert_allclose(maps[r], ref.values[L][r], rtol=1e-4, atol=1e-6 * ref.values[L][r].max())


def test_gpu_mode_runs_on_cpu_tiny(tmp_path):
    out = _bench("gpu", "--device", "cpu", "--tiny", "--reps", "1", "--seed-samples", "1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "benchmark_gpu.json").read_text())
    assert res["segments"][0][0] == 0 and res["segments"][-1][1] == res["seq_len"]
    # the default strategy is checked against vmap on the benchmark input before it is timed
    assert res["strategy_check"]["strategy"] == "manual" and res["strategy_check"]["rel_fro_vs_vmap"] < 1e-4
    assert res["fp32"]["strategy"] == "manual"
    for tag in ("fp32", "bf16"):  # every precision in one call; tf32 needs CUDA and is skipped on a CPU
        assert res[tag]["s_per_sample"] > 0 and res[tag]["precision"] == tag and res[tag]["strategy"] == "manual"
        assert abs(res["ratio_" + tag] - res["seed"]["s_per_sample"] / res[tag]["s_per_sample"]) < 1e-9
    assert res["tf32"] == {"skipped": "precision tf32 needs a CUDA device"} and "ratio_tf32" not in res
    assert "raysens fp32" in out.stdout and "raysens bf16" in out.stdout
    # chunk decisions come from the engine's public record of its last compute call (chunks_used)
    assert res["fp32"]["chunks"] and all(c >= 1 for c in res["fp32"]["chunks"])
    assert res["fp32"]["rows_per_segment"]


def test_strategies_mode_times_manual_and_vmap(tmp_path):
    out = _bench("strategies", "--models", "gpt2", "--samples", "2", "--batch", "2", "--seq-len", "8", "--rounds", "1",
                 "--threads", "1", "--layers", "-1", "99", "--json", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "s.json").read_text())
    assert [r["layer"] for r in res] == [-1]  # layer 99 does not exist in GPT-2 small: skipped, said so
    assert "skipped" in out.stdout + out.stderr
    r = res[0]
    assert r["speedup_median"] > 0 and len(r["s_per_sample"]["vmap"]) == len(r["s_per_sample"]["manual"]) == 1
    assert r["segments"]["manual"] >= r["segments"]["vmap"] >= 1


def test_generic_mode_times_hand_written_and_generic_paths(tmp_path):
    """jobs/bench/generic.py on tiny shapes: both parts, both modes; each engine took the path it is
    labelled with (the figure is a ratio of those two paths)."""
    out = _bench("generic", "--blocks", "2", "--fam-blocks", "1", "--fam-width", "32", "--families", "gemma",
                 "gpt-neox", "--samples", "1", "--seq-len", "6", "--rounds", "1", "--threads", "1",
                 "--json", str(tmp_path / "g.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "g.json").read_text())
    assert [(r["part"], r["mode"]) for r in res] == [("llama", "forward"), ("llama", "reverse"),
                                                     ("families", "forward"), ("families", "reverse")]
    for r in res:
        got = {k: (v["strategy"], v["mode"]) for k, v in r["results"].items()}
        hand, gen = ("hand-written", "generic") if r["part"] == "llama" else ("llama (hand-written)", "llama (generic)")
        assert got[hand] == ("manual", r["mode"]) and got[gen] == ("vmap", r["mode"])
        assert all(len(v["s_per_sample"]) == 1 and v["median"] > 0 for v in r["results"].values())
    assert set(res[2]["results"]) == {"llama (hand-written)", "llama (generic)", "gemma", "gpt-neox"}


def test_gpu_mode_times_vmap_when_the_default_strategy_fails_its_check(monkeypatch):
    model = make_model("llama")
    ids = torch.stack([random_ids(6, seed=1), random_ids(6, seed=2)])
    am = torch.ones_like(ids)
    engine = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1))
    assert engine.strategy_used == "manual"
    info = {}
    assert gpu.checked_strategy(engine, model, ids, am, "cpu", 1000, info) is engine
    assert info["strategy_check"]["rel_fro_vs_vmap"] < 1e-4

    def broken(*a, **k):
        raise RuntimeError("no kernel for this op")

    monkeypatch.setattr(engine, "compute", broken)
    info = {}
    timed = gpu.checked_strategy(engine, model, ids, am, "cpu", 1000, info)
    assert timed is not engine and timed.strategy_used == "vmap"
    assert "raised RuntimeError: no kernel for this op" in info["strategy_check"]["failed"]


def test_jacrev_baseline_equals_exact_estimator():
    """CPU mode's full-Jacobian baseline differentiates the engine's public forward (hidden_states)."""
    model = make_model("llama").eval()
    ids = random_ids(6, seed=3)[None]
    am = torch.ones_like(ids)
    engine = SensitivityEngine(model, SensitivityConfig(estimator="exact"))
    L = engine.resolve_layers(-1)[0]
    exact = engine.compute(ids, am, layers=L).values[L][0]
    assert len(engine.chunks_used) >= 1 and all(len(c) == 3 for c in engine.chunks_used)
    emb = model.get_input_embeddings()(ids).detach()[0]
    ref, jac_mb = cpu.jacrev_map(engine, emb, am, L)
    assert ref.shape == exact.shape == (6, 6) and jac_mb > 0
    np.testing.assert_allclose(exact, ref, rtol=1e-4, atol=1e-6 * ref.max())


def test_precision_bench_parts_on_a_tiny_model():
    """jobs/bench/precision.py's parts on a tiny Llama: timings, and bf16's error against fp32 next to a
    K=1 probe's own error (the comparison the benchmark documents)."""
    from jobs.bench import precision

    model = make_model("llama", seed=3)
    ids = torch.stack([random_ids(8, seed=s) for s in range(3)])
    am = torch.ones_like(ids)
    sp = precision.speed(model, ids, am, [0, 1, 2, 3], 1)
    assert sp["s_per_sample"]["fp32"] > 0 and sp["s_per_sample"]["bf16"] > 0 and sp["strategy"] == "manual"
    assert 1e-5 < sp["k1_mean_map_rel_err_max"] < 2e-2
    err, exact = precision.map_errors(model, ids, am, [1, 3])
    assert all(1e-5 < e["mean_map"] < 2e-2 and 1e-5 < e["per_map_mean"] <= e["per_map_max"] < 2e-2
               for e in err.values()), err
    h = precision.hutch_errors(model, ids, am, [1, 3], exact, seeds=(0,))
    assert all(v["bf16_vs_fp32"] < v["probe_vs_exact"] for v in h.values()), h
