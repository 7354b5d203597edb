"""Sweeps (raysens.run.grid, raysens.run.sweep): grid expansion, config errors, a 2-model × 2-seq-len sweep on local Ray
whose points equal standalone in-process runs, one model load per model per actor, and restarts
(finished points skipped, an interrupted point resumed from its partials)."""

from __future__ import annotations

import json
import os

import pytest

from pipeline_util import assert_same_stats
from raysens.run import grid
from raysens.run import sweep as runsweep
from raysens.testing import faults
from raysens.config import ConfigError
from raysens.run.runner import run_local, with_overrides

MERGE_RTOL = 0.0  # exact state (issue 18): bit for bit
N = 20  # samples per point
BATCH = 5  # -> 4 units per point
MODELS = ["random:tiny-gpt2", "random:tiny-llama"]
SEQ_LENS = [8, 12]


def sweep_dict(out, **over) -> dict:
    d = {
        "name": "t",
        "dir": str(out),
        "base": {"data": {"limit": N}, "sensitivity": {"estimator": "hutchinson", "num_probes": 2},
                 # tokenize_cpus=1: fewer tokenizer worker processes started at once on 2 cores
                 "cluster": {"num_actors": 1, "batch_size": BATCH, "cpus_per_actor": 1, "tokenize_cpus": 1},
                 "output": {"plots": False, "progress_every_s": 0}},
        "grid": {"models": MODELS, "seq_lens": SEQ_LENS, "layers": "all"},
    }
    return grid.merge_dicts(d, over)


def manifests(out) -> dict:
    return {c: json.load(open(os.path.join(out, c, "manifest.json")))
            for c in sorted(os.listdir(out)) if os.path.exists(os.path.join(out, c, "manifest.json"))}


# ---------------------------------------------------------------------- expansion and config errors
def test_expand_grid_names_order_and_layers(tmp_path):
    s = grid.sweep_from_dict(sweep_dict(tmp_path, grid={
        "estimators": [{"estimator": "hutchinson", "num_probes": 2}, {"estimator": "projection"}],
        "layers": {"tiny-gpt2": "all", "random:tiny-llama": [-1]}}))
    points = grid.expand(s)
    assert len(points) == 2 * 2 * 2
    assert [c.name for c in points[:4]] == [
        "tiny-gpt2__S8__bundled__hutchinson-K2", "tiny-gpt2__S8__bundled__projection",
        "tiny-gpt2__S12__bundled__hutchinson-K2", "tiny-gpt2__S12__bundled__projection"]
    assert all(c.config.model.name == "random:tiny-gpt2" for c in points[:4])  # grouped by model
    assert all(c.config.layers == (1, 2) for c in points[:4])  # "all" = hidden_states 1..n_layers
    assert all(c.config.layers == (-1,) for c in points[4:])
    c = points[5]
    assert c.config.data.max_seq_len == 8 and c.config.data.limit == N
    assert c.config.sensitivity.estimator.value == "projection"
    assert c.config.output.dir == os.path.join(str(tmp_path), c.name)
    assert c.axes == {"model": "tiny-llama", "model_name": "random:tiny-llama", "seq_len": 8,
                      "dataset": "bundled", "estimator": "projection"}
    assert len({c.config.fingerprint() for c in points}) == 8


def test_load_sweep_overrides_route_to_base_or_sweep(tmp_path):
    import yaml

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(sweep_dict(tmp_path / "out")))
    s = grid.load_sweep(p, ["--data.limit=7", "--grid.seq_lens=[6]", f"--dir={tmp_path / 'other'}",
                          "--address=127.0.0.1:1"])
    points = grid.expand(s)
    assert [c.name for c in points] == ["tiny-gpt2__S6__bundled__hutchinson-K2", "tiny-llama__S6__bundled__hutchinson-K2"]
    assert points[0].config.data.limit == 7 and points[0].config.cluster.address == "127.0.0.1:1"
    assert s.dir == str(tmp_path / "other")


@pytest.mark.parametrize("over, match", [
    ({"bogus": 1}, "unknown sweep key bogus"),
    ({"grid": {"seqlens": [8]}}, r"unknown sweep key grid\.seqlens"),
    ({"grid": {"models": [{"name": "random:tiny-gpt2", "layer": 1}]}}, r"grid\.models\[0\]\.layer"),
    ({"corpus": {"samples": 10, "lines": 3}}, r"corpus\.lines"),
    ({"base": {"data": {"limt": 3}}}, r"unknown config key data\.limt"),
    ({"grid": {"estimators": [{"estimator": "hutchinson", "probes": 2}]}}, "probes"),
    ({"base": {"output": {"dir": "x"}}}, "base.output.dir must not be set"),
    ({"grid": {"seq_lens": [0]}}, r"grid\.seq_lens\[0\]"),
    ({"grid": {"estimators": [{"num_probes": 2}, {"num_probes": 2, "seed": 1}]}}, "both named"),
    ({"grid": {"layers": {"tiny-gpt2": "all"}}}, "no entry for model 'tiny-llama'"),
])
def test_bad_sweep_configs_are_rejected(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        grid.sweep_from_dict(sweep_dict(tmp_path, **over))
    assert not os.path.exists(tmp_path / "sweep.json")


def test_window_corpus_is_distinct():
    text, stride = grid.window_corpus(10000, 24)
    lines = text.splitlines()
    assert len(lines) == 10000 == len(set(lines)) and stride >= 1
    assert all(len(x.split()) == 24 for x in lines)
    with pytest.raises(ConfigError, match="too few"):
        grid.window_corpus(100000, 24)


# ---------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """Each point's config run alone through the in-process core (the reference)."""
    base = tmp_path_factory.mktemp("standalone")
    points = grid.expand(grid.sweep_from_dict(sweep_dict(base / "unused")))
    return {c.name: run_local(with_overrides(c.config, output={"dir": str(base / c.name)})).load() for c in points}


@pytest.fixture(scope="module")
def ray_sweep(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    return runsweep.run_sweep(grid.sweep_from_dict(sweep_dict(out)))


@pytest.mark.ray
def test_ray_sweep_points_match_standalone_runs(ray_sweep, standalone):
    m = ray_sweep.manifest
    assert m["status"] == "complete" and m["backend"] == "ray"
    assert [c["name"] for c in m["points"]] == list(standalone)
    assert m["samples"]["computed_all_points"] == 4 * N
    for c in m["points"]:
        assert c["status"] == "complete" and c["this_run"] == "new"
        assert c["samples"] == {"total": N, "computed": N, "skipped": 0}
        run = ray_sweep.load(c["name"])
        assert run.manifest["fingerprint"] == c["fingerprint"]
        assert_same_stats(run, standalone[c["name"]], rtol=MERGE_RTOL)
    assert m["driver_memory"]["rss_peak_mb"] > 0


@pytest.mark.ray
def test_ray_sweep_loads_each_model_once_per_actor(ray_sweep):
    groups = ray_sweep.manifest["groups"]
    assert [g["model"] for g in groups] == MODELS
    ms = manifests(ray_sweep.dir)
    for g in groups:
        assert len(g["runs"]) == 2 and g["num_actors"] == 1
        assert g["model_loads"] == 1  # one actor, two points, one load: the pool (and weights) were reused
        ids = [tuple(ms[c]["backend"]["model_load_ids"]) for c in g["runs"]]
        assert ids[0] == ids[1] and len(ids[0]) == 1
    assert groups[0]["load_ids"] != groups[1]["load_ids"]


@pytest.mark.ray
def test_restart_skips_finished_points_and_resumes_interrupted_one(ray_session, standalone, tmp_path, monkeypatch):
    out = tmp_path / "s"
    sweep = grid.sweep_from_dict(sweep_dict(out))
    # one shipment per unit in the interrupted pass (partials counted below); not in the fingerprint
    local = grid.sweep_from_dict(sweep_dict(out, base={"cluster": {"use_ray": False, "ship_every_units": 1}}))
    assert [c.config.fingerprint() for c in grid.expand(local)] == [c.config.fingerprint() for c in grid.expand(sweep)]
    names = [c.name for c in grid.expand(sweep)]
    # 1) a driver interrupted after 10 units (in-process, so the unit order is deterministic): the two
    #    tiny-gpt2 points complete (4 units each), tiny-llama S8 has 2 of its 4 partials, S12 none
    monkeypatch.setenv(faults.INTERRUPT, "10")
    with pytest.raises(faults.SimulatedInterrupt):
        runsweep.run_sweep(local)
    monkeypatch.delenv(faults.INTERRUPT)
    state = json.load(open(out / "sweep.json"))
    assert state["status"] == "interrupted"
    assert [c["status"] for c in state["points"]] == ["complete", "complete", "interrupted", "interrupted"]  # one pass
    done = [open(out / n / "manifest.json").read() for n in names[:2]]
    assert [json.loads(m)["status"] for m in done] == ["complete", "complete"]
    m2 = json.loads(open(out / names[2] / "manifest.json").read())
    assert m2["status"] == "interrupted" and m2["units"]["done"] == 2
    assert len(os.listdir(out / names[2] / "partials")) == 2
    assert not os.path.exists(out / names[3] / "partials")
    # 2) the same sweep restarted on Ray: finished points skipped; one pass for tiny-llama resumes S8
    #    (2 units left) and computes S12
    s = runsweep.run_sweep(sweep)
    points = {c["name"]: c for c in s.manifest["points"]}
    assert [points[n]["this_run"] for n in names] == ["skipped (already complete)"] * 2 + ["resumed", "new"]
    assert [open(out / n / "manifest.json").read() for n in names[:2]] == done  # untouched
    assert [g["model"] for g in s.manifest["groups"]] == ["random:tiny-llama"]
    m2 = manifests(out)[names[2]]
    assert m2["units"]["reused"] == 2 and m2["units"]["computed_this_run"] == 2
    assert m2["backend"]["backend"] == "ray"
    assert s.manifest["samples"]["computed_this_run"] == 2 * BATCH + N
    for n in names:
        assert_same_stats(s.load(n), standalone[n], rtol=MERGE_RTOL)
        assert s.load(n)[2].count == N  # every sample exactly once
    # 3) a complete sweep restarted: nothing to compute (no Ray needed)
    again = runsweep.run_sweep(local)
    assert all(c["this_run"] == "skipped (already complete)" for c in again.manifest["points"])
    assert again.manifest["samples"]["computed_this_run"] == 0
    hist = again.manifest["history"]  # earlier invocations are kept, with what each computed
    assert [h["status"] for h in hist] == ["interrupted", "complete"]
    assert hist[1]["samples"]["computed_this_run"] == 2 * BATCH + N


def test_changed_point_config_in_same_dir_is_refused(tmp_path):
    out = tmp_path / "s"
    d = sweep_dict(out, base={"cluster": {"use_ray": False}}, grid={"models": MODELS[:1], "seq_lens": [6]})
    d["base"]["data"]["limit"] = 5
    runsweep.run_sweep(grid.sweep_from_dict(d))
    d["base"]["sensitivity"]["seed"] = 1  # same point name, different numbers
    with pytest.raises(runsweep.SweepError, match="different configuration"):
        runsweep.run_sweep(grid.sweep_from_dict(d))


def test_cli_sweep_dry_run_and_errors(tmp_path, capsys):
    import yaml

    from raysens.cli import main

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(sweep_dict(tmp_path / "out")))
    assert main(["sweep", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tiny-gpt2__S8__bundled__hutchinson-K2\tlayers=[1, 2]" in out and out.count("\n") == 4
    assert main(["sweep", str(p), "--grid.bogus=1"]) == 2
    assert "unknown sweep key grid.bogus" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_shipped_sweep_configs_expand(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "jobs", "configs")
    tiny = grid.load_sweep(os.path.join(root, "sweep_tiny_10k.yaml"), [f"--dir={tmp_path}"])
    (point,) = grid.expand(tiny)
    assert point.config.model.name.startswith("random:tiny") and point.config.layers == (1, 2)
    assert tiny.corpus["samples"] == 10000
    big = grid.load_sweep(os.path.join(root, "sweep_cluster_qwen2_1p5b.yaml"), [f"--dir={tmp_path}"])
    (point,) = grid.expand(big)
    assert point.config.layers == tuple(range(1, 29)) and point.config.data.max_seq_len == 64
    assert big.corpus["samples"] == 10000 and point.config.sensitivity.estimator.value == "hutchinson"
