"""RunConfig: YAML + dotted overrides, unknown keys rejected at every level, clear value errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysens.config import ConfigError, RunConfig, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["quickstart.yaml", "sweep_10k.yaml", "exact_minilm.yaml"])
def test_job_configs_load(name):
    assert isinstance(load_config(ROOT / "jobs" / "configs" / name), RunConfig)


def test_quickstart_config_is_the_documented_one():
    cfg = load_config(ROOT / "jobs" / "configs" / "quickstart.yaml")
    assert cfg.model.name == "smollm2" and cfg.data.source == "bundled" and cfg.data.max_seq_len == 32
    readme = (ROOT / "README.md").read_text()
    assert f"on {cfg.data.limit} paragraphs of the bundled corpus" in readme  # the README states what it runs
    assert 50 <= cfg.data.limit <= 1000 and cfg.layers == tuple(range(1, 31))  # the whole layer profile


def test_overrides_are_yaml_scalars_and_nested():
    d = parse_overrides(["--data.limit=100", "--layers=[3,-1]", "--cluster.address=ray://h:10001",
                         "--output.plots=false", "--sensitivity.num_probes=2", "--address=1.2.3.4:6379"])
    assert d == {"data": {"limit": 100}, "layers": [3, -1], "cluster": {"address": "1.2.3.4:6379"},
                 "output": {"plots": False}, "sensitivity": {"num_probes": 2}}
    cfg = load_config(None, ["--data.limit=100", "--layers=[3,-1]", "--sensitivity.estimator=exact"])
    assert cfg.data.limit == 100 and cfg.layers == (3, -1) and cfg.sensitivity.estimator.value == "exact"


@pytest.mark.parametrize("override, names", [
    ("--bogus=1", ["bogus", "model, data, sensitivity, layers, cluster, output"]),
    ("--data.txt_column=x", ["data.txt_column", "text_column"]),
    ("--cluster.num_gpus=1", ["cluster.num_gpus", "gpus_per_actor"]),
    ("--output.directory=x", ["output.directory", "dir"]),
    ("--model.path=x", ["model.path", "name"]),
    ("--sensitivity.probes=3", ["sensitivity.probes", "num_probes"]),
])
def test_unknown_keys_name_the_key_and_the_known_ones(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for n in names:
        assert n in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  limit: 5\n  colum: text\n")
    with pytest.raises(ConfigError, match="data.colum"):
        load_config(p)


@pytest.mark.parametrize("override, match", [
    ("--data.max_seq_len=0", "data.max_seq_len must be >= 1"),
    ("--data.max_seq_len=-3", "data.max_seq_len must be >= 1"),
    ("--data.limit=0", "data.limit"),
    ("--data.limit=ten", "data.limit must be an integer"),
    ("--cluster.num_actors=0", "cluster.num_actors"),
    ("--cluster.batch_size=0", "cluster.batch_size"),
    ("--cluster.batch_size=big", "cluster.batch_size must be a positive integer or auto, got 'big'"),
    ("--output.compact_every=-1", "output.compact_every must be >= 0"),
    ("--layers=[]", "layers"),
    ("--layers=[a]", r"layers\[0\] must be an integer"),
    ("--sensitivity.estimator=frobenius", "estimator"),
    ("--sensitivity.num_probes=0", "num_probes"),
    ("--output.plots=maybe", "output.plots must be true or false"),
    ("--data.kind=csv", "data.kind"),
])
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="--section.key=value"):
        load_config(None, ["data.limit=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_fingerprint_tracks_numbers_not_resources():
    a = load_config(None, [])
    assert a.fingerprint() == load_config(None, ["--cluster.num_actors=4", "--output.dir=x"]).fingerprint()
    assert a.fingerprint() != load_config(None, ["--cluster.batch_size=3"]).fingerprint()
    assert a.fingerprint() != load_config(None, ["--sensitivity.seed=1"]).fingerprint()
    assert a.fingerprint() != load_config(None, ["--data.limit=7"]).fingerprint()


@pytest.mark.parametrize("overrides, size", [
    ([], 8),  # auto, CPU
    (["--cluster.batch_size=null"], 8),
    (["--model.device=cpu", "--cluster.gpus_per_actor=1"], 8),  # the config says CPU
    (["--cluster.use_ray=false", "--cluster.gpus_per_actor=1"], 8),  # no Ray actors: the resource is unused
    (["--model.device=cuda"], 32),
    (["--model.device=cuda:1", "--cluster.use_ray=false"], 32),
    (["--cluster.gpus_per_actor=1"], 32),
    (["--cluster.gpus_per_actor=0.5"], 32),
    (["--cluster.gpus_per_actor=1", "--cluster.batch_size=5"], 5),  # given sizes win
])
def test_auto_batch_size_is_decided_by_the_config_alone(overrides, size):
    cfg = load_config(None, overrides)
    assert cfg.batch_size == size
    explicit = load_config(None, [o for o in overrides if "batch_size" not in o] + [f"--cluster.batch_size={size}"])
    assert cfg.fingerprint() == explicit.fingerprint()  # auto resolves before hashing: same units, same runs


def test_auto_batch_size_keeps_the_fingerprint_of_the_old_default_8():
    import hashlib
    import json

    d = load_config(None, []).to_dict()
    old = {"model": {k: d["model"][k] for k in ("name", "trust_remote_code")}, "data": d["data"],
           "sensitivity": d["sensitivity"], "layers": sorted(set(d["layers"])), "batch_size": 8}
    old_fp = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    # units grouped by length (the default since issue 31) are another layout: another fingerprint;
    # group_by_length: false is the old layout and keeps the old fingerprint (older directories resume)
    assert load_config(None, ["--cluster.group_by_length=false"]).fingerprint() == old_fp
    assert load_config(None, []).legacy_fingerprint() == old_fp != load_config(None, []).fingerprint()


def test_roundtrip_to_dict():
    cfg = load_config(None, ["--layers=[2,-1]", "--sensitivity.num_probes=3", "--data.shuffle=true"])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
