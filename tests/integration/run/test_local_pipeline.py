"""The in-process path (same units, same core code, no Ray): run directory, skips, resume,
corrupt partials and bad input. The Ray path shares all of this driver code (test_ray_pipeline)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline_util import KEEP, assert_same_stats, config, PER_UNIT
from raysens.corpus.reader import CorpusError
from raysens.store.rundir import RunError
from raysens.run.runner import run_local
from raysens.store.results import load_run


def _partials(d):
    return sorted(p for p in os.listdir(os.path.join(d, "partials")) if p.endswith(".npz"))


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """An uninterrupted in-process run: 30 samples, batch 4 (8 units, the last one short)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    s = run_local(config(tiny_model, out, "--data.limit=30", "--cluster.batch_size=4", PER_UNIT, "--output.plots=true", KEEP))
    return s


def test_run_directory_layout_and_loader(reference):
    import raysens

    d = reference.run_dir
    m = json.load(open(os.path.join(d, "manifest.json")))
    assert m["status"] == "complete" and m["samples"]["computed"] == 30 and m["samples"]["total"] == 30
    assert m["layers"] == [1, 2] and m["estimator"] == "hutchinson" and m["seed"] == 0
    assert set(m["versions"]) >= {"raysens", "torch", "transformers", "ray"}
    assert m["model"]["class"] == "LlamaForCausalLM" and m["model"]["num_hidden_layers"] == 2
    assert m["units"] == {"total": 8, "batch_size": 4, "reused": 0, "computed_this_run": 8, "corrupt_recomputed": [],
                          "compaction": {"checkpoint": None, "units_folded": 0, "compactions": 0,
                                         "leftovers_deleted": 0, "compact_every": 0}}
    assert len(_partials(d)) == 8
    run = raysens.load_run(d)
    assert sorted(run.layers) == [1, 2]
    for L in (1, 2):
        ls = run[L]
        assert ls.count == 30 and ls.mean.shape == (10, 10) and ls.mean.dtype == np.float64
        assert np.all(np.triu(np.nan_to_num(ls.mean), 1) == 0)  # causal model: j > i is exactly 0
        assert (ls.cell_count[0, 0] == 30) and np.isfinite(ls.var[:2, :2]).all()
    # open formats: plain numpy reads the stats
    z = np.load(os.path.join(d, "stats", "layer_002.npz"))
    np.testing.assert_array_equal(z["mean"], run[2].mean)
    assert any(p.endswith("heatmap.png") for p in m.get("plots", [])), m.get("plots")


def test_resume_recomputes_only_missing_and_corrupt(reference, tiny_model, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(reference.run_dir, d)
    names = _partials(d)
    os.remove(d / "partials" / names[0])  # lost
    os.remove(d / "partials" / names[5])
    p = d / "partials" / names[2]
    p.write_bytes(p.read_bytes()[:-100])  # truncated
    p = d / "partials" / names[3]
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    p.write_bytes(bytes(raw))
    for f in (d / "stats").iterdir():
        f.unlink()
    s = run_local(config(tiny_model, d, "--data.limit=30", "--cluster.batch_size=4", PER_UNIT, KEEP))
    u = s.manifest["units"]
    assert u["computed_this_run"] == 4 and u["reused"] == 4
    assert sorted(c["file"] for c in u["corrupt_recomputed"]) == sorted([names[2], names[3]])
    assert all("checksum" in c["reason"] for c in u["corrupt_recomputed"])
    assert len(os.listdir(d / "partials" / "corrupt")) == 2  # kept for inspection, never merged
    assert s.manifest["samples"]["computed"] == 30
    assert_same_stats(s.load(), reference.load())  # bit for bit: same units, same merge order
    assert [n[:15] for n in _partials(d)] == [n[:15] for n in names]  # deterministic units: same unit keys


def test_rerun_of_a_finished_run_computes_nothing(reference, tiny_model, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(reference.run_dir, d)
    s = run_local(config(tiny_model, d, "--data.limit=30", "--cluster.batch_size=4", PER_UNIT))
    assert s.manifest["units"]["computed_this_run"] == 0
    assert_same_stats(s.load(), reference.load())


def test_other_config_in_same_dir_is_refused_and_nothing_is_lost(reference, tiny_model, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(reference.run_dir, d)
    before = {n: (d / "partials" / n).read_bytes() for n in _partials(d)}
    for extra in (["--sensitivity.seed=1"], ["--cluster.batch_size=5", PER_UNIT], ["--data.max_seq_len=9"]):
        with pytest.raises(RunError, match="different configuration"):
            run_local(config(tiny_model, d, "--data.limit=30", "--cluster.batch_size=4", PER_UNIT, *extra))
    with pytest.raises(RunError, match="out of range"):
        run_local(config(tiny_model, d, "--data.limit=30", "--cluster.batch_size=4", PER_UNIT, "--layers=[7]"))
    with pytest.raises(CorpusError, match="does not exist"):
        run_local(config(tiny_model, d, "--data.limit=30", "--cluster.batch_size=4", PER_UNIT, f"--data.source={d}/missing.jsonl"))
    with pytest.raises(RunError, match="output.resume is false"):
        run_local(config(tiny_model, d, "--data.limit=30", "--cluster.batch_size=4", PER_UNIT, "--output.resume=false"))
    assert {n: (d / "partials" / n).read_bytes() for n in _partials(d)} == before
    assert json.load(open(d / "manifest.json"))["status"] == "complete"


def test_bad_layer_index_is_a_clear_error(tiny_model, tmp_path):
    for layers in ("[3]", "[-4]", "[0,9]"):
        with pytest.raises(RunError, match=r"layer -?\d+ out of range; this model has hidden_states 0..2"):
            run_local(config(tiny_model, tmp_path / "r", "--data.limit=4", f"--layers={layers}"))
    assert not (tmp_path / "r").exists()  # nothing written before validation


def test_empty_and_one_token_texts_are_skipped_and_counted(tiny_model, tmp_path):
    rows = ["Real text with several words in it.", "", "   ", "Hi", None, 42, "Another perfectly fine sentence.",
            "word"]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    s = run_local(config(tiny_model, tmp_path / "r", f"--data.source={src}", "--cluster.batch_size=3", PER_UNIT,
                         "--data.add_special_tokens=false"))
    sm = s.manifest["samples"]
    assert sm["computed"] == 2 and sm["skipped"] == 6 and sm["total"] == 8
    assert sm["skipped_ids"] == {"empty": [1, 2, 4], "not_text": [5], "too_short": [3, 7]}
    assert s.load()[2].count == 2


def test_all_samples_skipped_is_an_error_with_a_manifest(tiny_model, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("\n \nok\n")
    with pytest.raises(RunError, match="no sample could be computed"):
        run_local(config(tiny_model, tmp_path / "r", f"--data.source={src}", "--data.add_special_tokens=false"))
    m = json.load(open(tmp_path / "r" / "manifest.json"))
    assert m["status"] == "failed" and m["samples"]["skipped_by_reason"] == {"empty": 2, "too_short": 1}


def test_empty_corpus_and_missing_column_fail_before_writing(tiny_model, tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        run_local(config(tiny_model, tmp_path / "r", f"--data.source={tmp_path}/e.jsonl"))
    (tmp_path / "c.jsonl").write_text('{"body": "a b c d"}\n')
    with pytest.raises(CorpusError, match="no key 'text'"):
        run_local(config(tiny_model, tmp_path / "r", f"--data.source={tmp_path}/c.jsonl"))
    assert not (tmp_path / "r").exists()


def test_nonfinite_samples_are_reported_by_id(nan_model, tmp_path, bundled_texts):
    s = run_local(config(nan_model, tmp_path / "r", "--data.limit=24", "--cluster.batch_size=8", PER_UNIT))
    from raysens.backends.units import get_tokenizer

    tok = get_tokenizer(nan_model, False)
    (nan_id,) = tok("is", add_special_tokens=False)["input_ids"]
    enc = tok(bundled_texts[:24], truncation=True, max_length=10)["input_ids"]
    bad = [i for i, ids in enumerate(enc) if nan_id in ids]
    assert bad, "test corpus slice should contain the NaN word"
    sm = s.manifest["samples"]
    assert sm["skipped_ids"].get("nonfinite") == bad
    assert sm["computed"] == 24 - len(bad)
    for L in (1, 2):
        assert np.isfinite(s.load()[L].mean[0, 0])


def test_missing_model_is_a_clear_error(tmp_path):
    from raysens.core.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="no-such-model"):
        run_local(config(str(tmp_path / "no-such-model"), tmp_path / "r", "--data.limit=2"))


def test_shuffled_selection_runs_the_picked_ids(tiny_model, tmp_path):
    s = run_local(config(tiny_model, tmp_path / "r", "--data.limit=6", "--data.shuffle=true",
                         "--data.shuffle_seed=5", KEEP))
    from raysens.config import DataConfig
    from raysens.corpus.reader import Corpus

    ids = Corpus(DataConfig(limit=6, shuffle=True, shuffle_seed=5)).select(s.manifest["samples"]["corpus_rows"])
    assert sorted(int(p[5:15]) for p in _partials(s.run_dir)) == sorted(int(u) for u in ids[::8])
    assert s.manifest["samples"]["computed"] == 6


def test_progress_line_rate_and_eta_exclude_start_up():
    from raysens.run.driver import Progress

    p = Progress(100, 0, every_s=1e9)
    assert p.line(0.0) == "0/100 samples (0%) · measuring the rate"
    p.first, p.done = (50.0, 10), 30  # first result after 50 s of start-up, 20 more samples in 10 s
    assert p.line(60.0) == "30/100 samples (30%) · 2.00 samples/s · ETA 35s"
    p.done = 100
    assert p.line(95.0).startswith("100/100 samples (100%) · 2.00 samples/s · ETA 0s")
