"""Fixtures for the pipeline's integration tests: tiny random-weight models, small corpora, one
local Ray session per test module that needs Ray (ray.init is slow on 2 cores)."""

from __future__ import annotations

import json
import os
import sys

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Random 2-layer Llama (causal), hidden 32, MiniLM tokenizer."""
    from raysens.distributed.testing import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def nan_model(tmp_path_factory):
    """Like tiny_model, but the word "is" has a NaN embedding (non-finite sensitivities)."""
    from raysens.distributed.testing import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-nan", nan_token="is"))


@pytest.fixture(scope="session")
def bundled_texts():
    from raysens.corpus import bundled_corpus_path

    with open(bundled_corpus_path()) as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray per module: 4 logical CPUs on a 2-core machine (DESIGN.md §6)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
