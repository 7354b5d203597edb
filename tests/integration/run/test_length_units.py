"""Units grouped by length (issue 31, ``cluster.group_by_length``, the default): what it changes in a
run (which samples share a unit, the fingerprint) and what it does not (the samples, their counts,
the statistics up to the float32 rounding of the batched passes, bounded here by the per-sample
maps themselves); a run directory of the old layout is refused in one line and resumes with the
switch off. In process (the Ray path runs the same units: test_ray_pipeline compares 1 vs N actors)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline_util import config
from raysens.run.prepare import prepare
from raysens.run.runner import run_local
from raysens.store.per_sample import read_per_sample
from raysens.store.rundir import RunError

ARGS = ("--data.limit=24", "--cluster.batch_size=4", "--cluster.use_ray=false", "--data.max_seq_len=48",
        "--output.per_sample=true", "--output.compact_every=0")


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("bylen")
    out = {}
    for g in ("true", "false"):
        cfg = config(tiny_model, base / g, *ARGS, f"--cluster.group_by_length={g}")
        out[g] = (cfg, prepare(cfg), run_local(cfg))
    return out


def _maps(run_dir) -> dict:
    t = read_per_sample(run_dir).to_pydict()
    return {(s, L): np.asarray(v, np.float64) for s, L, v in zip(t["sample_id"], t["layer"], t["values"])}


def test_grouped_units_hold_other_samples_and_pad_less(runs, bundled_texts):
    (cfg_g, grouped, _), (cfg_c, consecutive, _) = runs["true"], runs["false"]
    assert cfg_g.fingerprint() != cfg_c.fingerprint() == cfg_g.legacy_fingerprint()
    assert sorted(np.concatenate(grouped.units).tolist()) == list(range(24)) == np.concatenate(consecutive.units).tolist()
    assert [u.tolist() for u in consecutive.units] == [list(range(i, i + 4)) for i in range(0, 24, 4)]
    assert [u.tolist() for u in grouped.units] != [u.tolist() for u in consecutive.units]
    chars = np.array([len(bundled_texts[i]) for i in range(24)])  # the driver's length key, from the corpus itself
    order = np.lexsort((np.arange(24), chars))
    assert sorted(u.tolist() for u in grouped.units) == sorted(sorted(order[i:i + 4].tolist()) for i in range(0, 24, 4))
    assert grouped.unit_lengths == {int(u[0]): int(chars[u].max()) for u in grouped.units}  # the dispatch order's key
    assert consecutive.unit_lengths is None
    padded = {k: sum(len(u) * chars[u].max() for u in p.units) for k, p in (("g", grouped), ("c", consecutive))}
    assert padded["g"] < padded["c"]


def test_statistics_equal_the_consecutive_layout_within_the_per_sample_rounding(runs):
    """The state is exact (a function of the multiset of per-sample maps, docs/DESIGN.md §2), so the
    layouts can differ only where a sample's map does: the engine pads a unit to its longest sample
    and the batched float32 passes round differently at another padded length. Bound: for sums of
    non-negative values, |Σx' − Σx| ≤ r·Σx with r the largest relative difference of one sample's map
    between the layouts (measured on the exported float32 maps, hence the ulp of slack)."""
    (_, _, sg), (_, _, sc) = runs["true"], runs["false"]
    mg, mc = _maps(sg.run_dir), _maps(sc.run_dir)
    assert mg.keys() == mc.keys() and len(mg) == 24 * 2
    r = max(float(np.max(np.abs(mg[k] - mc[k]) / np.where(mc[k] > 0, mc[k], 1.0))) for k in mc)
    assert r < 1e-5  # float32 rounding of the batched passes, not another computation
    a, b = sg.load(), sc.load()
    for L in a.layers:
        x, y = a[L], b[L]
        assert x.count == y.count == 24
        np.testing.assert_array_equal(x.cell_count, y.cell_count)
        for k in ("sum", "mean"):
            xv, yv = np.nan_to_num(getattr(x, k)), np.nan_to_num(getattr(y, k))
            assert np.all(np.abs(xv - yv) <= (r + 2.0 ** -23) * yv), (L, k)
        np.testing.assert_allclose(x.max, y.max, rtol=r + 2.0 ** -23, equal_nan=True)


def test_a_directory_of_the_old_layout_is_refused_in_one_line_and_resumes_with_the_switch_off(runs, tiny_model):
    cfg_c, _, sc = runs["false"]
    grouped_here = config(tiny_model, sc.run_dir, *ARGS)  # the default: grouped
    with pytest.raises(RunError) as e:
        run_local(grouped_here)
    msg = str(e.value)
    assert "\n" not in msg and "units of consecutive sample_ids" in msg and "--cluster.group_by_length=false" in msg
    assert json.load(open(os.path.join(sc.run_dir, "manifest.json")))["status"] == "complete"  # nothing changed
    again = run_local(cfg_c)
    assert again.manifest["units"]["reused"] == 6 and again.manifest["units"]["computed_this_run"] == 0
