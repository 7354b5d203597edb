"""The benchmarks' one harness (``jobs/harness.py``): a child measures the given tree's ``raysens`` with
this checkout's ``jobs``, returns its dict, fails with its output; the RSS sampler sees an allocation
in this process and in a child; the corpus, JSON and alternation helpers."""

from __future__ import annotations

import json
import mmap
import time
from pathlib import Path

import pytest

from jobs import harness

CHILD_MODULE = '''
import time
import jobs.harness as h

def alloc(spec):
    h.ready()
    x = bytearray(spec["mib"] << 20)
    x[::4096] = b"x" * len(x[::4096])  # touch every page
    time.sleep(2.0)  # long enough for the parent's sampler on a loaded machine
    return {"n": len(x), "hwm": h.proc_status_mib("VmHWM")}

def boom(spec):
    raise ValueError("planted failure " + spec["tag"])
'''


def _tree(tmp_path: Path) -> Path:
    """A stand-in for another checkout: its own raysens, a decoy jobs package and a module of its own."""
    tree = tmp_path / "tree"
    (tree / "raysens").mkdir(parents=True)
    (tree / "raysens" / "__init__.py").write_text("")
    (tree / "jobs").mkdir()
    (tree / "jobs" / "__init__.py").write_text("raise ImportError('the measured tree\\'s jobs must not be used')")
    (tree / "probe_mod.py").write_text(CHILD_MODULE)
    return tree


def test_a_child_uses_the_trees_raysens_and_this_checkouts_jobs(tmp_path):
    tree = _tree(tmp_path)
    got = harness.run_child("jobs.harness:provenance", tree=tree)
    assert got == {"raysens": str((tree / "raysens").resolve()), "jobs": str(harness.REPO / "jobs")}
    here = harness.run_child("jobs.harness:provenance")
    assert here["raysens"] == str(harness.REPO / "raysens")


def test_a_failed_child_raises_with_its_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)probe_mod:boom under .*ValueError: planted failure xyz"):
        harness.run_child("probe_mod:boom", {"tag": "xyz"}, tree=_tree(tmp_path))


def test_the_sampler_sees_an_allocation_in_a_child_from_its_ready_line(tmp_path):
    r = harness.run_child("probe_mod:alloc", {"mib": 64}, tree=_tree(tmp_path), sample_rss=True, every_s=0.01)
    assert r["n"] == 64 << 20
    assert 64 <= r["sampled_peak_mb"] <= r["hwm"] + 1  # the sampler's peak holds the 64 MiB, never above VmHWM


def test_the_sampler_sees_an_allocation_in_this_process():
    # fresh anonymous pages (mmap), not heap memory a long-running test process may already hold; the
    # baseline is read before the allocation (the sampler's first reading may come after it)
    with harness.RssSampler(every_s=0.01) as rss:
        base = harness.proc_status_mib("VmRSS")
        x = mmap.mmap(-1, 96 << 20)
        for i in range(0, len(x), 4096):
            x[i] = 1
        t0 = time.perf_counter()
        while rss.peak_mib - base < 80 and time.perf_counter() - t0 < 20:  # a loaded machine
            time.sleep(0.05)
    x.close()
    assert rss.peak_mib - base >= 80
    assert rss.peak_mib <= harness.proc_status_mib("VmHWM") + 1


def test_corpus_json_and_alternation(tmp_path, capsys):
    path = harness.synthetic_corpus(tmp_path / "c.txt", 5, 16)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 == len(set(lines)) and all(len(line.split()) >= 16 for line in lines)
    harness.write_json({"a": 1, "p": tmp_path}, tmp_path / "r.json", echo=True)
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1, "p": str(tmp_path)}
    out = capsys.readouterr()
    assert json.loads(out.out) == {"a": 1, "p": str(tmp_path)} and "wrote" in out.err
    assert list(harness.alternate(["base", "this"], 2)) == [(0, "base"), (0, "this"), (1, "base"), (1, "this")]
    assert harness.dir_bytes(tmp_path) == path.stat().st_size + (tmp_path / "r.json").stat().st_size


def test_thread_minflt_counts_the_fresh_pages_this_thread_touches():
    before = harness.thread_minflt()
    x = mmap.mmap(-1, 32 << 20)  # 8192 fresh anonymous pages (never heap memory already touched), each written once
    for i in range(0, len(x), 4096):
        x[i] = 1
    assert harness.thread_minflt() - before >= 8  # ≥ 8 even with 2 MiB huge pages (16 of them)
    x.close()


def test_write_json_makes_the_folder(tmp_path):
    harness.write_json({"a": [1, 2]}, tmp_path / "new" / "deeper" / "r.json")
    assert json.loads((tmp_path / "new" / "deeper" / "r.json").read_text()) == {"a": [1, 2]}
