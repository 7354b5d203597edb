"""Settings and fixtures of the Ray-free unit tests; shared helpers (models, the float64 jacrev
reference) are in ``refs.py``."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)

# These models are tiny: one intra-op thread is as fast, and on a shared 2-core machine it avoids the
# OpenMP spin-waiting that made some calls 10-30x slower under load. RAYSENS_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("RAYSENS_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)
    yield
