"""The ``gpu`` marker: tests that need a CUDA device, skipped without one (``jobs/device_check.sh``
runs them on a lent GPU machine). Only the Ray-free core is imported; ``refs`` (tiny models, the
float64 oracle) comes from tests/unit through pyproject's ``pythonpath``."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; jobs/device_check.sh)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
