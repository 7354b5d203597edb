"""Models without a hand-written path through the whole in-process pipeline (issue 19,
docs/DESIGN.md §1.1, §1.4): the fallback chain's choice for BLOOM (an old-style
``autograd.Function`` that ``torch.func.jvp`` refuses) is what the manifest's ``backend.strategies``
records, and the numbers equal the engine's own; an unsupported model (Funnel pools positions) is
refused with one line before any sample is computed. No Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline_util import KEEP, config
from raysens.run.runner import run_local


def _save(tmp_path_factory, name, make):
    """A seeded random model with the MiniLM tokenizer's vocabulary, saved with that tokenizer."""
    import torch
    import transformers as tf

    from raysens.core.models import packaged_model_path

    tok = tf.AutoTokenizer.from_pretrained(str(packaged_model_path("minilm")))
    torch.manual_seed(0)
    model = make(tf, len(tok), tok.pad_token_id).eval()
    out = tmp_path_factory.mktemp("models") / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory):
    return _save(tmp_path_factory, "tiny-bloom", lambda tf, v, pad: tf.BloomForCausalLM(tf.BloomConfig(
        vocab_size=v, hidden_size=16, n_layer=2, n_head=4, pad_token_id=pad)))


@pytest.fixture(scope="module")
def bloom_runs(bloom_dir, tmp_path_factory):
    """``{mode: run directory}``: the same 4 samples, exact, layers 1 and -1, in each mode."""
    out = {}
    for mode in ("forward", "reverse"):
        d = tmp_path_factory.mktemp(f"bloom-{mode}") / "run"
        run_local(config(bloom_dir, d, "--data.limit=4", "--cluster.batch_size=2", "--layers=[1,-1]",
                         "--sensitivity.estimator=exact", f"--sensitivity.mode={mode}", "--cluster.use_ray=false",
                         KEEP))
        out[mode] = d
    return out


@pytest.mark.parametrize("mode,strategy", [("forward", "double-vjp"), ("reverse", "vmap")])
def test_fallback_strategy_is_recorded_in_the_manifest(bloom_runs, mode, strategy):
    m = json.load(open(bloom_runs[mode] / "manifest.json"))
    assert m["status"] == "complete" and m["samples"]["computed"] == 4
    assert m["backend"]["strategies"] == [strategy] and m["backend"]["modes"] == [mode]


def test_fallback_numbers_equal_the_other_mode(bloom_runs):
    """double-vjp (forward) and batched backward (reverse) are independent paths to the same exact maps."""
    from raysens.store.results import load_run

    fwd, rev = (load_run(str(bloom_runs[m])) for m in ("forward", "reverse"))
    assert sorted(fwd.layers) == sorted(rev.layers) == [1, 2]
    for L in fwd.layers:
        a, b = fwd[L].mean, rev[L].mean
        seen = rev[L].cell_count > 0
        assert seen.sum() > 16 and np.array_equal(fwd[L].cell_count, rev[L].cell_count)
        np.testing.assert_allclose(a[seen], b[seen], rtol=1e-4, atol=1e-7 * np.abs(b[seen]).max())


def test_unsupported_model_is_refused_in_one_line_before_any_work(tmp_path_factory, tmp_path):
    funnel = _save(tmp_path_factory, "tiny-funnel", lambda tf, v, pad: tf.FunnelBaseModel(tf.FunnelConfig(
        vocab_size=v, d_model=16, n_head=2, d_head=8, d_inner=32, block_sizes=[1, 1], num_decoder_layers=1)))
    cfg = config(funnel, tmp_path / "run", "--data.limit=4", "--cluster.batch_size=2", "--layers=[-1]",
                 "--cluster.use_ray=false", KEEP)
    with pytest.raises(Exception) as exc:
        run_local(cfg)
    msg = str(exc.value)
    assert "FunnelBaseModel is not supported: " in msg and "\n" not in msg.strip(), msg
    partials = tmp_path / "run" / "partials"
    assert not partials.exists() or not [p for p in os.listdir(partials) if p.endswith(".npz")]
