"""Synthetic models (raysens.core.models.synthetic) for pipeline benchmarks: names, shapes, determinism —
a sample's maps do not depend on its batch, so pipeline equality checks hold with them."""

from __future__ import annotations

import numpy as np
import pytest

from raysens.core.models import ModelLoadError, load_model, load_tokenizer_and_config
from raysens.core.models.synthetic import SyntheticEngine, parse


def test_names_parse_and_bad_names_are_refused():
    assert parse("synthetic:L28-lat0.2").blocks == 28 and parse("synthetic:L28-lat0.2").latency_s == 0.2
    assert parse("synthetic:L3").latency_s == 0.0
    for bad in ("synthetic:28", "synthetic:L0", "synthetic:L2-lat", "synthetic:L2-fast"):
        with pytest.raises(ModelLoadError, match="synthetic:L28"):
            load_model(bad)


def test_tokenizer_and_config_need_no_files():
    tok, cfg = load_tokenizer_and_config("synthetic:L4")
    assert cfg.num_hidden_layers == 4 and cfg.model_type == "synthetic"
    ids = tok(["abcdefgh" * 10, "xy"], truncation=True, max_length=16)["input_ids"]
    assert [len(i) for i in ids] == [16, 1] and all(3 <= t < 1003 for t in ids[0])


def test_maps_have_real_shapes_are_causal_and_batch_independent():
    eng = SyntheticEngine(load_model("synthetic:L3").model)
    ids = np.ones((3, 6), np.int64)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    res = eng.compute(ids, mask, layers=[1, -1], sample_ids=[7, 8, 9])
    assert res.layers == (1, 3) and res.values[3].shape == (3, 6, 6)
    assert np.array_equal(res.lengths, [6, 4, 5]) and not res.mask[1, 4:].any()
    v = res.values[1]
    assert (v[0] > 0)[np.tril_indices(6)].all() and (v[0][np.triu_indices(6, 1)] == 0).all()
    alone = eng.compute(ids[1:2, :4], None, layers=[1, -1], sample_ids=[8])
    for L in (1, 3):
        np.testing.assert_array_equal(alone.values[L][0], res.values[L][1, :4, :4])
    assert not np.array_equal(res.values[1][0], res.values[3][0])  # layers differ
