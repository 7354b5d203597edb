"""A model's content identity (``core.models.identity``): small files by their SHA-256, large ones by the
SHA-256 of their header and evenly spread samples (a few MiB read whatever the size), and the resume
check (``store.rundir.diff_inputs``) that compares them."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from raysens.core.models import identity as weights
from raysens.store.rundir import diff_inputs


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_small_files_are_hashed_whole_large_ones_sampled(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSENS_CACHE", str(tmp_path / "cache"))
    data = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    f = _write(tmp_path / "w.bin", data)
    small = weights.file_digest(f)
    assert small == {"file": "w.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    monkeypatch.setattr(weights, "FULL_HASH_MAX", 1 << 20)
    big = weights.file_digest(f)
    assert set(big) == {"file", "size", "sample_sha256", "sample"} and big["size"] == len(data)
    # the sample: the first MiB (a header), then SAMPLE_BLOCKS blocks spread evenly to the end
    head, span, B, n = 1 << 20, len(data) - (1 << 20), weights.SAMPLE_BYTES, weights.SAMPLE_BLOCKS
    h = hashlib.sha256(f"{len(data)}|".encode())
    h.update(data[:head])
    for i in range(n):
        off = head + (span - B) * i // (n - 1)
        h.update(data[off:off + B])
    assert big["sample_sha256"] == h.hexdigest()
    # a change inside a sampled block changes it; a change between blocks does not (documented)
    changed = bytearray(data)
    changed[len(data) - 1] ^= 1  # the last block ends at the end of the file
    _write(f, bytes(changed))
    assert weights.file_digest(f)["sample_sha256"] != big["sample_sha256"]
    gap = head + B + ((span - B) // (n - 1) - B) // 2  # between the first two blocks after the header
    changed = bytearray(data)
    changed[gap] ^= 1
    _write(f, bytes(changed))
    assert weights.file_digest(f)["sample_sha256"] == big["sample_sha256"]


def test_sampled_safetensors_digest_covers_the_header(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    monkeypatch.setattr(weights, "FULL_HASH_MAX", 1024)
    t = torch.arange(4096, dtype=torch.float32)
    save_file({"a": t}, str(tmp_path / "m.safetensors"))
    one = weights.file_digest(tmp_path / "m.safetensors")["sample_sha256"]
    save_file({"b": t}, str(tmp_path / "m.safetensors"))  # same bytes of data, another tensor name
    assert weights.file_digest(tmp_path / "m.safetensors")["sample_sha256"] != one


@pytest.mark.parametrize("old, new, differs", [
    ({"size": 10, "sha256": "a" * 64}, {"size": 10, "sha256": "a" * 64}, False),
    ({"size": 10, "sha256": "a" * 64}, {"size": 10, "sha256": "b" * 64}, True),
    ({"size": 10, "sample_sha256": "a" * 64}, {"size": 10, "sample_sha256": "b" * 64}, True),
    ({"size": 10, "sha256": "a" * 64}, {"size": 10, "sample_sha256": "b" * 64}, False),  # a manifest from before
    ({"size": 10, "sha256": "a" * 64}, {"size": 11, "sample_sha256": "b" * 64}, True),
])
def test_resume_compares_the_digests_both_identities_have(old, new, differs):
    got = diff_inputs({"model": {"kind": "dir", "files": [{"file": "model.safetensors", **old}]}},
                      {"model": {"kind": "dir", "path": "/m", "files": [{"file": "model.safetensors", **new}]}})
    assert bool(got) == differs
    if differs and "sample_sha256" in old:
        assert "sampled SHA-256 aaaaaaaaaaaa… -> bbbbbbbbbbbb…" in got[0]
