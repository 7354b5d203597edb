"""Issue 29, paired runs end to end on a tiny random Llama: the stats files of a paired run (side a,
side b under stats/b/, the differences under stats/diff/) are the same bits with 1 and 2 Ray actors,
with an actor killed mid-run, after a resume, and in process; they equal the core path (two
``SensitivityEngine``s and ``PairedCells`` folded here); side a's files equal an ordinary run of model
a; mismatched tokenizers / depths and planned runs are refused in one line, and mapped depths run."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from pipeline_util import KEEP, PER_UNIT, config, stats_files
from raysens.run.runner import run, run_local
from raysens.store.rundir import RunError

N = 12
BATCH = "--cluster.batch_size=3"
PAIR = ("--sensitivity.num_probes=2", "--paired.scale={module: layers.1.mlp, factor: 1.5}")


def all_stats(run_dir) -> dict:
    """Every stats file of a run (side a, stats/b/, stats/diff/): ``{path: {member: array}}``."""
    import glob

    out = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "stats", "**", "*.npz"), recursive=True)):
        with np.load(f) as z:
            out[os.path.relpath(f, run_dir)] = {k: z[k] for k in z.files}
    return out


def assert_same_files(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and len(a) == 6  # 2 layers x (a, b, diff)
    for f in a:
        assert sorted(a[f]) == sorted(b[f]), f
        for k in a[f]:
            np.testing.assert_array_equal(a[f][k], b[f][k], err_msg=f"{f} {k}")


@pytest.fixture(scope="module")
def local_pair(tiny_model, tmp_path_factory):
    """The in-process paired run, one partial per unit kept (the resume test deletes one)."""
    return run_local(config(tiny_model, tmp_path_factory.mktemp("pair") / "r", f"--data.limit={N}", BATCH, KEEP,
                            PER_UNIT, *PAIR))


def test_side_a_is_an_ordinary_run_and_the_manifest_says_paired(local_pair, tiny_model, tmp_path):
    plain = run_local(config(tiny_model, tmp_path / "plain", f"--data.limit={N}", BATCH, PAIR[0]))
    a, b = stats_files(local_pair.run_dir), stats_files(plain.run_dir)
    assert sorted(a) == sorted(b) == ["layer_001.npz", "layer_002.npz"]
    for f in a:
        for k in a[f]:
            np.testing.assert_array_equal(a[f][k], b[f][k], err_msg=f"{f} {k}")
    p = local_pair.manifest["paired"]
    assert p["layer_map"] == {"1": 1, "2": 2} and p["common_probes"] is True and p["fdr"] == 0.05
    assert p["b"]["scale"] == {"module": "layers.1.mlp", "factor": 1.5}
    assert p["stats_diff"] == {"1": "stats/diff/layer_001.npz", "2": "stats/diff/layer_002.npz"}
    assert local_pair.manifest["stats"] == plain.manifest["stats"]
    assert local_pair.manifest["fingerprint"] != plain.manifest["fingerprint"]  # side b is in the fingerprint


def test_equals_two_engines_and_paired_cells_folded_here(local_pair, tiny_model):
    from raysens.backends.units import get_tokenizer, tokenize_unit
    from raysens.core.engine import SensitivityConfig, SensitivityEngine
    from raysens.core.models import load_model
    from raysens.corpus.reader import Corpus
    from raysens.config import RunConfig
    from raysens.stats.paired import PairedCells
    from raysens.store.paired_results import read_diff_stats, read_paired_state

    cfg = RunConfig.from_dict(local_pair.manifest["config"])
    lm = load_model(tiny_model)
    b = load_model(tiny_model).model
    with __import__("torch").no_grad():
        for p in b.layers[1].mlp.parameters():
            p.mul_(1.5)
    sens = SensitivityConfig.from_dict(cfg.sensitivity.to_dict())
    ea, eb = SensitivityEngine(lm.model, sens), SensitivityEngine(b, sens)
    tok, corpus, d = get_tokenizer(tiny_model, False), Corpus(cfg.data), cfg.data
    acc: dict[int, PairedCells] = {}
    for s0 in range(0, N, 3):
        u = tokenize_unit(list(range(s0, s0 + 3)), corpus.texts(list(range(s0, s0 + 3))), tok, d.max_seq_len,
                          d.min_tokens, d.add_special_tokens)
        seqs = u["input_ids"]
        w = max(map(len, seqs))
        ids, mask = np.zeros((len(seqs), w), np.int64), np.zeros((len(seqs), w), np.int64)
        for r, s in enumerate(seqs):
            ids[r, :len(s)], mask[r, :len(s)] = s, 1
        ra, rb = (e.compute(ids, mask, layers=[1, 2], sample_ids=u["run_ids"], max_seq_len=d.max_seq_len)
                  for e in (ea, eb))
        for L in (1, 2):
            batch = PairedCells.from_batch(np.asarray(ra.values[L]), np.asarray(rb.values[L]), np.asarray(ra.mask),
                                           np.asarray(ra.noise[L]), np.asarray(rb.noise[L]), sample_ids=u["run_ids"])
            if L not in acc:
                acc[L] = batch
                continue
            width = max(acc[L].shape[0], batch.shape[0])
            acc[L] = acc[L].padded(width).merge(batch.padded(width))
    seq = local_pair.manifest["seq_len"]
    for L in (1, 2):
        got, want = read_paired_state(local_pair.run_dir, L).to_arrays(), acc[L].crop(seq).to_arrays()
        assert sorted(got) == sorted(want)
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"layer {L} {k}")
        diff = read_diff_stats(local_pair.run_dir, L)
        np.testing.assert_array_equal(diff["mean_diff"], acc[L].crop(seq).differences()["mean_diff"])
    assert np.all(read_diff_stats(local_pair.run_dir, 1)["mean_diff"][np.isfinite(read_diff_stats(local_pair.run_dir, 1)["mean_diff"])] == 0)


@pytest.mark.ray
@pytest.mark.parametrize("actors", [1, 2])
def test_ray_actors_give_the_same_bits(ray_session, local_pair, tiny_model, tmp_path, actors):
    s = run(config(tiny_model, tmp_path / "r", f"--data.limit={N}", BATCH, *PAIR, f"--cluster.num_actors={actors}",
                   "--cluster.cpus_per_actor=1", "--cluster.ship_every_units=2"))
    assert s.manifest["backend"]["backend"] == "ray" and s.manifest["samples"]["computed"] == N
    assert s.manifest["paired"]["b"]["identity"] == local_pair.manifest["paired"]["b"]["identity"]
    assert_same_files(all_stats(s.run_dir), all_stats(local_pair.run_dir))


@pytest.mark.ray
def test_killed_actor_and_resume_give_the_same_bits(ray_session, local_pair, tiny_model, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    # killed as it starts its second unit: 4 units over 2 actors give one of them at least 2 (with "2",
    # an actor had to get 3 of the 4 units, which the balanced dispatch of §9.3 often prevents: the
    # hook did not fire in ~1 run of 3, on main as well)
    monkeypatch.setenv("RAYSENS_TEST_KILL_AFTER_UNITS", "1")
    monkeypatch.setenv("RAYSENS_TEST_KILL_MARKER", str(marker))
    s = run(config(tiny_model, tmp_path / "k", f"--data.limit={N}", BATCH, *PAIR, "--cluster.num_actors=2",
                   "--cluster.cpus_per_actor=1", "--cluster.ship_every_units=3"))
    assert marker.exists(), "the fault hook did not fire: no actor was killed"
    assert s.manifest["samples"]["computed"] == N
    assert_same_files(all_stats(s.run_dir), all_stats(local_pair.run_dir))
    monkeypatch.delenv("RAYSENS_TEST_KILL_AFTER_UNITS")
    d = tmp_path / "resumed"
    shutil.copytree(local_pair.run_dir, d)  # the in-process run's partials, one lost, resumed on Ray
    names = sorted(n for n in os.listdir(d / "partials") if n.endswith(".npz"))
    os.remove(d / "partials" / names[1])
    shutil.rmtree(d / "stats")
    r = run(config(tiny_model, d, f"--data.limit={N}", BATCH, *PAIR))
    assert r.manifest["units"]["computed_this_run"] == 1
    assert_same_files(all_stats(r.run_dir), all_stats(local_pair.run_dir))


# ---------------------------------------------------------------------- refusals and mapped depths
def _saved(tmp_path, name: str, layers: int = 2, extra_token: str | None = None, hidden: int | None = None) -> str:
    """A tiny random Llama saved to a directory with MiniLM's tokenizer (``extra_token``: one more token;
    ``hidden``: another width)."""
    import torch
    import transformers

    from raysens.core.models import load_tokenizer_and_config

    tok, cfg = load_tokenizer_and_config("random:tiny-llama")
    cfg = transformers.LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": layers,
                                      **({"hidden_size": hidden} if hidden else {})})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = transformers.LlamaModel(cfg)
    out = tmp_path / name
    model.save_pretrained(out)
    if extra_token:
        tok.add_tokens([extra_token])
    tok.save_pretrained(out)
    return str(out)


def test_mismatched_tokenizer_is_refused_in_one_line(tiny_model, tmp_path):
    other = _saved(tmp_path, "tok", extra_token="zzqxw")
    with pytest.raises(RunError) as e:
        run_local(config(tiny_model, tmp_path / "r", "--data.limit=4", f"--paired.model.name={other}"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"paired: side a ({tiny_model}) and side b ({other}) have different "
                                              "vocabularies (30522 vs 30523 tokens; only in b: ['zzqxw'])")
    assert "pick a side b that shares side a's tokenizer" in msg and not (tmp_path / "r").exists()


def test_depths_must_match_unless_mapped(tiny_model, tmp_path):
    deep = _saved(tmp_path, "deep", layers=3)
    with pytest.raises(RunError) as e:
        run_local(config(tiny_model, tmp_path / "r", "--data.limit=4", f"--paired.model.name={deep}"))
    assert str(e.value) == (f"paired: side a ({tiny_model}) has 2 blocks and side b ({deep}) 3; layers are matched "
                            "by index, so map every target layer with paired.layer_map {a_layer: b_layer} "
                            "(unmapped: [1, 2])")
    s = run_local(config(tiny_model, tmp_path / "m", "--data.limit=6", BATCH, f"--paired.model.name={deep}",
                         "--paired.layer_map={1: 1, -1: -1}"))
    assert s.manifest["paired"]["layer_map"] == {"1": 1, "2": 3}
    assert s.manifest["paired"]["b"]["num_hidden_layers"] == 3
    assert s.manifest["inputs"]["model_b"]["kind"] == "dir" and s.manifest["paired"]["b"]["identity"]["files"]


def test_another_width_is_recorded_as_probes_not_common(tiny_model, tmp_path):
    from raysens.run.prepare import base_manifest, prepare

    wide = _saved(tmp_path, "wide", hidden=64)
    p = prepare(config(tiny_model, tmp_path / "r", "--data.limit=4", f"--paired.model.name={wide}"))
    m = base_manifest(p, "running", "now")["paired"]
    assert m["common_probes"] is False and m["a"]["hidden_size"] == 32 and m["b"]["hidden_size"] == 64
    same = prepare(config(tiny_model, tmp_path / "s", "--data.limit=4", f"--paired.model.name={wide}",
                          "--sensitivity.estimator=exact"))
    assert base_manifest(same, "running", "now")["paired"]["common_probes"] is True  # exact: no probes at all


def test_a_planned_run_is_refused(tiny_model, tmp_path):
    with pytest.raises(RunError, match=r"^paired: a planned run \(sensitivity\.target_rel_se, budget or layer_plan\) "
                                       r"cannot be paired"):
        run_local(config(tiny_model, tmp_path / "r", "--data.limit=4", "--sensitivity.budget=3",
                         "--paired.random_init=true"))


def test_the_bundled_paired_config_runs_from_the_command_line(tiny_model, tmp_path):
    """``raysens run jobs/configs/paired_minilm_random.yaml`` with the tiny model in place of MiniLM."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "cli"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-m", "raysens.cli", "run", "jobs/configs/paired_minilm_random.yaml",
                        f"--model.name={tiny_model}", "--data.max_seq_len=8", "--layers=[1,-1]", "--data.limit=4",
                        "--cluster.use_ray=false", "--output.plots=false", "--paired.init_seed=3", f"--output.dir={out}"],
                       cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "paired: side a = MiniLM-L6, side b = MiniLM-L6 random init; side b in stats/b/" in p.stdout
    assert (out / "stats" / "diff" / "layer_002.npz").exists() and (out / "stats" / "b" / "layer_001.parquet").exists()


@pytest.mark.ray
def test_another_model_on_ray_matches_in_process(ray_session, tiny_model, tmp_path):
    """Side b another model (a directory): on Ray its identity is computed by a Ray task (the driver reads
    no weight file), recorded as inputs.model_b, and the stats are the in-process run's bit for bit."""
    other = _saved(tmp_path, "other")
    extra = ("--data.limit=6", BATCH, f"--paired.model.name={other}")
    loc = run_local(config(tiny_model, tmp_path / "local", *extra))
    s = run(config(tiny_model, tmp_path / "ray", *extra, "--cluster.num_actors=1", "--cluster.cpus_per_actor=1"))
    assert s.manifest["inputs"]["model_b"]["files"] == loc.manifest["inputs"]["model_b"]["files"]
    assert s.manifest["paired"]["b"]["identity"]["files"] == loc.manifest["inputs"]["model_b"]["files"]
    assert_same_files(all_stats(s.run_dir), all_stats(loc.run_dir))
