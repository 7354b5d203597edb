"""Issue 29, paired runs: the ``paired:`` config section (``PairedConfig``) — one-line errors with the
closest key for a misspelt one, the variants that may not be combined, the fingerprint (side b
changes it, fdr and labels do not), a round trip through dicts and YAML overrides. No Ray, no torch."""

from __future__ import annotations

import pytest

from raysens.config import ConfigError, PairedConfig, RunConfig, load_config


def cfg(**paired) -> RunConfig:
    return RunConfig.from_dict({"paired": paired})


def test_an_ordinary_run_has_no_paired_section():
    assert RunConfig().paired is None and RunConfig.from_dict({"paired": None}).paired is None


def test_variants_and_round_trip():
    c = cfg(scale={"module": "model.layers.3.mlp", "factor": 1.01}, layer_map={"3": 2}, labels=["base", "scaled"])
    assert c.paired.scale == {"module": "model.layers.3.mlp", "factor": 1.01}
    assert c.paired.layer_map == {3: 2} and c.paired.labels == ("base", "scaled")
    assert RunConfig.from_dict(c.to_dict()) == c
    m = cfg(model={"name": "minilm"}, precision="bf16").paired
    assert m.model.name == "minilm" and m.side_b["model"] == {"name": "minilm", "trust_remote_code": False}
    assert cfg(random_init=True, init_seed=7).paired.side_b["init_seed"] == 7


def test_overrides_reach_the_section():
    c = load_config(None, ["--paired.random_init=true", "--paired.init_seed=3", "--paired.fdr=0.1"])
    assert c.paired == PairedConfig(random_init=True, init_seed=3, fdr=0.1)


def test_fingerprint_follows_side_b_not_fdr_or_labels():
    base = RunConfig().fingerprint()
    a, b = cfg(random_init=True, init_seed=0).fingerprint(), cfg(random_init=True, init_seed=1).fingerprint()
    assert len({base, a, b}) == 3
    assert cfg(random_init=True, init_seed=0, fdr=0.1, labels=["x", "y"]).fingerprint() == a
    assert cfg(precision="bf16").fingerprint() != cfg(precision="fp32").fingerprint()


@pytest.mark.parametrize("paired,match", [
    ({"modle": {"name": "x"}}, r"^unknown config key paired\.modle \(did you mean paired\.model\?\); known keys in paired: model, "),
    ({"model": {"nmae": "x"}}, r"^unknown config key paired\.model\.nmae \(did you mean paired\.model\.name\?\)"),
    ({"precision": "fp16"}, r"^paired\.precision must be one of \['fp32', 'bf16', 'tf32'\] or null, got 'fp16'$"),
    ({"fdr": 0}, r"^paired\.fdr must be in \(0, 1\), got 0\.0$"),
    ({"init_seed": -1}, r"^paired\.init_seed must be >= 0"),
    ({"scale": {"module": "layers.0", "factr": 2}}, r"^unknown config key paired\.scale\.factr \(did you mean paired\.scale\.factor\?\)"),
    ({"scale": {"module": "", "factor": 2}}, r"^paired\.scale\.module must name a module"),
    ({"scale": {"module": "layers.0", "factor": "big"}}, r"^paired\.scale\.factor must be a finite number"),
    ({"scale": {"module": "layers.0", "factor": float("nan")}}, r"^paired\.scale\.factor must be a finite number"),
    ({"layer_map": {"a": 1}}, r"^paired\.layer_map must map side a's layer indices to side b's"),
    ({"layer_map": {1: 1.5}}, r"^paired\.layer_map must map"),
    ({"labels": ["only one"]}, r"^paired\.labels must be two non-empty names"),
    ({"random_init": True, "scale": {"module": "x", "factor": 2}}, r"^paired: random_init and scale each make side b"),
    ({"random_init": True, "model": {"name": "minilm"}}, r"^paired: random_init and scale"),
    ({"scale": {"module": "x", "factor": 2}, "precision": "bf16"}, r"^paired: random_init and scale"),
    ({"random_init": "yes"}, r"^paired\.random_init must be true or false"),
])
def test_bad_values_are_one_line_config_errors(paired, match):
    with pytest.raises(ConfigError, match=match) as e:
        cfg(**paired)
    assert "\n" not in str(e.value)
