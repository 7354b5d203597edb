"""The tree of merges on a local Ray (issue 31; docs/DESIGN.md §9.4): a Ray run whose compactions
fold through ``merges.tree_merge`` (``merge_partials`` as Ray tasks) gives stats files equal bit for
bit to the same run with the merger off, and ``tree_merge`` itself returns what an in-process merge
returns, or raises the ``PartialError`` of a partial that is not what its name says."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline_util import assert_same_stats, config, stats_files
from raysens.backends import merges, spec
from raysens.run.runner import run
from raysens.store.checkpoint import Fold
from raysens.store.partials import PartialError, decode_partial, merge_partials, partial_name
from raysens.store.rundir import RunDir

pytestmark = pytest.mark.ray
N, BATCH = 24, 3  # 8 units


def _cfg(model, out):
    return config(model, out, f"--data.limit={N}", f"--cluster.batch_size={BATCH}", "--cluster.num_actors=2",
                  "--cluster.cpus_per_actor=1", "--cluster.ship_every_units=1", "--output.compact_every=4")



def test_a_ray_run_with_the_tree_of_merges_equals_the_run_without(ray_session, tiny_model, tmp_path, monkeypatch):
    merged = []
    real = merges.tree_merge

    def counted(payloads, fan_in=None, **kw):
        out = real(payloads, fan_in, **kw)
        merged.append((len(kw["names"]), out is not None))
        return out

    monkeypatch.setattr(merges, "tree_merge", counted)
    monkeypatch.setattr(spec, "TREE_MIN_S", 0.0)  # tiny states: the tree would not be worth it (spec.TREE_MIN_S)
    tree = run(_cfg(tiny_model, tmp_path / "tree"))
    assert merged and all(ok for _, ok in merged) and all(k >= 4 for k, _ in merged)  # the tree did merge
    monkeypatch.setattr(RunDir, "set_merger", lambda self, *a, **k: None)  # the merger off
    n = len(merged)
    off = run(_cfg(tiny_model, tmp_path / "off"))
    assert len(merged) == n  # not called
    assert tree.manifest["samples"] == off.manifest["samples"] and tree.manifest["samples"]["computed"] == N
    assert_same_stats(tree.load(), off.load(), rtol=0.0)
    a, b = stats_files(tree.run_dir), stats_files(off.run_dir)
    assert list(a) == list(b) and a
    for f in a:
        assert list(a[f]) == list(b[f])
        for k in a[f]:
            assert a[f][k].dtype == b[f][k].dtype and np.array_equal(a[f][k], b[f][k], equal_nan=True), (f, k)


def _payloads(n_units=7, size=3, layers=(1, 4), fp="f" * 16):
    """Synthetic partials (one unit each, widths 2..6, K=2 probe noise, one skipped id) and their names."""
    from raysens.stats.cells import CellStats
    from raysens.store.partials import encode_partial

    out = []
    for u in range(n_units):
        ids = list(range(u * size, (u + 1) * size))
        computed = [i for i in ids if i != 4]
        rng = np.random.default_rng(u)
        s = 2 + u % 5
        mask = np.broadcast_to(np.tril(np.ones((s, s), bool)), (len(computed), s, s))
        states = {L: CellStats.from_batch(rng.lognormal(0, 2, mask.shape) * mask, mask, rng.random(mask.shape) * mask,
                                          computed) for L in layers}
        meta = {"fingerprint": fp, "units": [ids[0]], "unit_ids": [ids], "computed_ids": computed,
                "skipped": {"4": "empty"} if 4 in ids else {}, "layers": list(layers), "compute_s": 0.1 * u + 0.01,
                "device": "cpu", "strategy": "manual", "mode": "reverse"}
        out.append(encode_partial(meta, states))
    return out, [partial_name(int(decode_partial(p).units[0]), p) for p in out], layers, fp


def test_tree_merge_equals_the_in_process_merge_and_names_a_bad_partial(ray_session):
    payloads, names, layers, fp = _payloads()
    out = merges.tree_merge(iter(payloads), 3, names=names, checks={"fingerprint": fp})
    ref = merge_partials(payloads)
    one_by_one, via_tree, in_process = Fold(layers), Fold(layers), Fold(layers)
    for p in payloads:
        one_by_one.add(decode_partial(p), "unused")
    via_tree.add(decode_partial(out), "unused")
    in_process.add(decode_partial(ref), "unused")
    assert via_tree.encode(fp) == one_by_one.encode(fp) == in_process.encode(fp)
    assert decode_partial(out).meta["merged"] == len(payloads)
    bad = [payloads[0], payloads[1][:-10] + b"\0" * 10] + payloads[2:]
    with pytest.raises(PartialError, match=f"{names[1]}: checksum mismatch"):
        merges.tree_merge(bad, 4, names=names, checks={})


def _same_as_in_process(out, payloads, layers, fp):
    via_tree, one_by_one = Fold(layers), Fold(layers)
    via_tree.add(decode_partial(out), "unused")
    for p in payloads:
        one_by_one.add(decode_partial(p), "unused")
    return via_tree.encode(fp) == one_by_one.encode(fp)


@pytest.mark.parametrize("fault,fan_in,said,n_lines", [
    ("hang:600:{m}", 3, "did not finish within 4 s (cancelled); it runs again", 1),  # a hung task: cancelled, run again
    # one task (fan-in 8 > 7 partials) that hangs twice: the driver merges its inputs itself
    ("hang:600:{m}:2", 8, "did not finish within 4 s (cancelled) on its second try; the driver merges its 7 inputs", 2),
    ("exit:{m}", 3, None, 0),  # a task whose worker dies: Ray runs it again (max_retries), nothing to say
])
def test_a_hung_or_dead_merge_task_is_retried_and_nothing_is_lost(ray_session, tmp_path, monkeypatch, capfd,
                                                                  fault, fan_in, said, n_lines):
    """Issue 31: the tree's tasks have a timeout (``task_timeout_s``; ``spec.tree_task_timeout_s`` in a
    run). A merge task that hangs (``RAYSENS_TEST_MERGE_FAULT``, testing/faults.py) is cancelled and
    run again, or merged by the driver when it hangs again; each in one log line; the result is the
    in-process merge's, bit for bit, and the other tasks' merges are kept."""
    payloads, names, layers, fp = _payloads(n_units=7)
    monkeypatch.setenv("RAYSENS_TEST_MERGE_FAULT", fault.format(m=tmp_path / "marker"))
    t0 = time.monotonic()
    out = merges.tree_merge(iter(payloads), fan_in, names=names, checks={"fingerprint": fp}, task_timeout_s=4)
    took = time.monotonic() - t0
    assert out is not None and _same_as_in_process(out, payloads, layers, fp)
    assert decode_partial(out).meta["merged"] == len(payloads)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "tree of merges" in ln]
    assert len(lines) == n_lines, err  # one line per event
    if said is not None:
        assert said in lines[-1], err
        assert took < 60  # not the 600 s of the hang
    assert (tmp_path / "marker.0").exists()  # the fault did fire
