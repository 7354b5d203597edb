"""Rolling compaction through the whole in-process pipeline (raysens.run.runner → RunDir.compact →
driver.finalize; docs/DESIGN.md §6.6): stats files bit for bit those of a run that kept every
partial, after a crash at every compaction step and a rerun, and in a sweep; the manifest carries
the same samples, skips, compute time and per-sample export."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline_util import PER_UNIT, config, stats_files
from raysens.run import grid
from raysens.run import sweep as runsweep
from raysens.run.runner import run_local
from raysens.testing import faults

LIMIT, BATCH = 22, 3  # 8 units, the last one short


def _cfg(model, out, every, *extra):
    return config(model, out, f"--data.limit={LIMIT}", f"--cluster.batch_size={BATCH}", PER_UNIT,
                  f"--output.compact_every={every}", "--output.per_sample=true", *extra)



def assert_bitwise(a, b):
    sa, sb = stats_files(a), stats_files(b)
    assert list(sa) == list(sb) and sa
    for f in sa:
        assert list(sa[f]) == list(sb[f])
        for k in sa[f]:
            x, y = sa[f][k], sb[f][k]
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), (f, k)
    ma, mb = (json.load(open(os.path.join(d, "manifest.json"))) for d in (a, b))
    assert ma["samples"] == mb["samples"] and ma["seq_len"] == mb["seq_len"]
    assert ma["timings"]["compute_s_total"] > 0
    assert {k: ma["backend"][k] for k in ("devices", "strategies", "modes")} == \
           {k: mb["backend"][k] for k in ("devices", "strategies", "modes")}
    if "per_sample" in ma:
        assert ma["per_sample"]["files"] == mb["per_sample"]["files"]
    return ma, mb


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """Every partial kept (compaction off)."""
    return run_local(_cfg(tiny_model, tmp_path_factory.mktemp("ref") / "run", 0)).run_dir


def test_compacted_run_is_bit_for_bit_and_keeps_only_the_partials_in_flight(reference, tiny_model, tmp_path):
    s = run_local(_cfg(tiny_model, tmp_path / "run", 3))
    ma, mb = assert_bitwise(s.run_dir, reference)
    assert ma["units"]["compaction"]["compactions"] == 3 and ma["units"]["compaction"]["units_folded"] == 8
    assert len(os.listdir(tmp_path / "run" / "partials")) == 0  # finalize folded the last 2 units too
    assert len(os.listdir(tmp_path / "run" / "checkpoint")) == 1
    assert ma["per_sample"]["files"] == 8  # folded units were exported before their partials went
    assert sorted(os.listdir(tmp_path / "run" / "per_sample")) == sorted(os.listdir(os.path.join(reference, "per_sample")))
    with open(os.path.join(reference, "partials", sorted(os.listdir(os.path.join(reference, "partials")))[0]), "rb") as f:
        from raysens.store.partials import read_meta

        assert read_meta(f.read())["format"] == 3  # one shipment per file (issue 18)


@pytest.mark.parametrize("crash", ["folded::2", "written::2", "old_deleted::2", "deleted:1:2", "deleted:3:1"])
def test_a_run_crashed_mid_compaction_resumes_bit_for_bit(reference, tiny_model, tmp_path, monkeypatch, crash):
    out = tmp_path / "run"
    monkeypatch.setenv(faults.COMPACT_CRASH, crash)
    monkeypatch.setitem(faults._compactions, "n", 0)
    with pytest.raises(faults.SimulatedInterrupt):
        run_local(_cfg(tiny_model, out, 3))
    monkeypatch.delenv(faults.COMPACT_CRASH)
    assert json.load(open(out / "manifest.json"))["status"] == "interrupted"
    s = run_local(_cfg(tiny_model, out, 3))
    ma, _ = assert_bitwise(s.run_dir, reference)
    done_before = 3 if crash.endswith("1") else 6
    assert ma["units"]["reused"] == done_before and ma["units"]["computed_this_run"] == 8 - done_before
    assert ma["units"]["compaction"]["units_folded"] == 8 and os.listdir(out / "partials") == []


def test_a_corrupt_checkpoint_is_recomputed_and_a_rerun_of_a_complete_run_changes_nothing(reference, tiny_model,
                                                                                           tmp_path):
    out = tmp_path / "run"
    run_local(_cfg(tiny_model, out, 3))
    (name,) = os.listdir(out / "checkpoint")
    (out / "checkpoint" / name).write_bytes((out / "checkpoint" / name).read_bytes()[:-10])  # truncated
    s = run_local(_cfg(tiny_model, out, 3))
    ma, _ = assert_bitwise(s.run_dir, reference)
    assert ma["units"]["corrupt_recomputed"][0]["file"] == f"checkpoint/{name}"
    assert ma["units"]["computed_this_run"] == 8 and ma["units"]["reused"] == 0  # every unit was in it
    again = run_local(_cfg(tiny_model, out, 3))
    assert_bitwise(again.run_dir, reference)
    assert again.manifest["units"]["computed_this_run"] == 0


def test_sweep_with_compaction_crashed_and_restarted_matches_a_sweep_without(tiny_model, tmp_path, monkeypatch):
    def sweep(out, every):
        return grid.sweep_from_dict({
            "name": "c", "dir": str(out),
            "base": {"data": {"limit": 12}, "cluster": {"use_ray": False, "batch_size": 2, "ship_every_units": 1},
                     "output": {"plots": False, "progress_every_s": 0, "compact_every": every}},
            "grid": {"models": [tiny_model], "seq_lens": [6, 9], "layers": "all"}})

    ref = runsweep.run_sweep(sweep(tmp_path / "ref", 0))
    monkeypatch.setenv(faults.COMPACT_CRASH, "deleted:1:3")  # the 3rd compaction of the sweep, mid-deletion
    monkeypatch.setitem(faults._compactions, "n", 0)
    with pytest.raises(faults.SimulatedInterrupt):
        runsweep.run_sweep(sweep(tmp_path / "c", 2))
    monkeypatch.delenv(faults.COMPACT_CRASH)
    s = runsweep.run_sweep(sweep(tmp_path / "c", 2))
    assert [p["status"] for p in s.manifest["points"]] == ["complete", "complete"]
    for p in ref.manifest["points"]:
        assert_bitwise(os.path.join(s.dir, p["name"]), os.path.join(ref.dir, p["name"]))
        assert os.listdir(os.path.join(s.dir, p["name"], "partials")) == []  # 6 units, compacted 2 at a time
