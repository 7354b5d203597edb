"""Fixtures for the pipeline's integration tests: tiny random-weight models, small corpora, one
local Ray session per test module that needs Ray (ray.init is slow on 2 cores)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


TINY = "random:tiny-llama"  # seeded random 2-layer Llama, hidden 32, MiniLM tokenizer (raysens.core.models)


@pytest.fixture(scope="session")
def tiny_model():
    return TINY


@pytest.fixture(scope="session")
def nan_model(tmp_path_factory):
    """The tiny model saved to disk with the word "is" given a NaN input embedding: every sample
    containing it has non-finite sensitivities."""
    import torch

    from raysens.core.models import load_model

    lm = load_model(TINY)
    (tid,) = lm.tokenizer("is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[tid] = float("nan")
    out = tmp_path_factory.mktemp("models") / "tiny-nan"
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def bundled_texts():
    from raysens.corpus.reader import bundled_corpus_path

    with open(bundled_corpus_path()) as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray per module: 4 logical CPUs on a 2-core machine (docs/DESIGN.md §7)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
