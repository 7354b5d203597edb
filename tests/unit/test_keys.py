"""Unknown configuration keys name the closest valid key (config, the engine's options, sweeps)."""

import pytest

from raysens._keys import unknown_keys
from raysens.config import ConfigError, load_config
from raysens.core.options import SensitivityConfig


@pytest.mark.parametrize("over, expect", [
    ({"cluster": {"num_actor": 2}}, "unknown config key cluster.num_actor (did you mean cluster.num_actors?)"),
    ({"data": {"limt": 3}}, "unknown config key data.limt (did you mean data.limit?)"),
    ({"sensitivity": {"estimatr": "exact"}}, "unknown config key sensitivity.estimatr (did you mean sensitivity.estimator?)"),
    ({"modle": {"name": "x"}}, "unknown config key modle (did you mean model?)"),
])
def test_config_names_the_closest_key(over, expect):
    with pytest.raises(ConfigError) as info:
        load_config(None, over)
    assert str(info.value).startswith(expect)
    assert "known keys in" in str(info.value)  # and still lists them all


def test_no_hint_when_nothing_is_close():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"data": {"zzzqqq": 1}})
    assert "did you mean" not in str(info.value) and "data.zzzqqq" in str(info.value)


def test_several_unknown_keys_each_get_their_own_hint():
    msg = unknown_keys({"limt": 1, "max_seqlen": 2, "ok": 3}, ["limit", "max_seq_len", "ok"], "data.")
    assert msg == "data.limt (did you mean data.limit?), data.max_seqlen (did you mean data.max_seq_len?)"
    assert unknown_keys({"limit": 1}, ["limit"]) is None


def test_engine_options_name_the_closest_key():
    with pytest.raises(ValueError, match=r"unknown keys \['num_probs'\] \(did you mean 'num_probes' for 'num_probs'\?\)"):
        SensitivityConfig.from_dict({"num_probs": 2})
