"""``jobs.bench.common.core_module``: the split core's module where it exists, the flat pre-issue-28 one
where it does not (a child measuring a baseline tree), and no fallback that would hide a real error."""

from __future__ import annotations

import pytest

from jobs.bench.common import core_module


def test_the_split_core_module_in_this_tree():
    import raysens.core.passes.fused as fused

    assert core_module("passes.fused", "fused") is fused


def test_falls_back_to_the_flat_module_when_the_split_one_is_missing():
    import raysens.core.engine as engine

    assert core_module("no_such_package.engine", "engine") is engine


def test_an_import_error_inside_the_module_is_not_hidden(monkeypatch):
    # a module that exists but itself imports something missing: that error must surface, not the fallback
    def boom(name, *a, **kw):
        raise ModuleNotFoundError("No module named 'not_installed_dep'", name="not_installed_dep")

    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a, **kw: boom(name) if name == "raysens.core._broken_for_test.x" else real(name, *a, **kw))
    with pytest.raises(ModuleNotFoundError, match="not_installed_dep"):
        core_module("_broken_for_test.x", "engine")
