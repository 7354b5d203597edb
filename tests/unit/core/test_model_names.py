"""The one name -> kind dispatch of model names (``raysens.core.models.registry.source_kind``) that
``load_model``, ``load_tokenizer_and_config`` and ``model_identity`` share: the order of the checks
decides names that fit two kinds (a packaged name that is also a directory, a ``.gguf`` path)."""

from __future__ import annotations

import os

import pytest

from raysens.core.models.registry import source_kind


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name, kind", [
    ("synthetic:L4-lat0.01", "synthetic"),
    ("random:tiny-llama", "random"),
    ("random:no-such-preset", "random"),  # refused later, by the loader, with the list of presets
    ("minilm", "packaged"),
    ("smollm2", "packaged"),
    ("absent.gguf", "gguf"),
    ("./absent.gguf", "gguf"),  # .gguf is checked before "meant as a path"
    ("./absent-dir", "missing"),
    ("~/absent-raysens-dir-xyz", "missing"),
    ("org/model", "hub"),
    ("model", "hub"),
])
def test_kinds_of_names_that_do_not_exist(in_tmp, name, kind):
    assert source_kind(name) == kind


def test_existing_paths_are_local_unless_a_packaged_name_or_gguf(in_tmp):
    (in_tmp / "mydir").mkdir()
    (in_tmp / "minilm").mkdir()  # a directory named like a packaged model: the packaged model wins
    (in_tmp / "weights.gguf").write_bytes(b"GGUF")
    assert source_kind("mydir") == "local"
    assert source_kind("./mydir") == "local"
    assert source_kind(str(in_tmp / "mydir") + os.sep) == "local"
    assert source_kind("minilm") == "packaged"
    assert source_kind("weights.gguf") == "gguf"
