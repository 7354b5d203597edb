"""raysens.report.plots / raysens.report.analysis: PNGs rendered from known statistics (no Ray, no torch)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

mpimg = pytest.importorskip("matplotlib.image")

from raysens.report import analysis as an  # noqa: E402
from raysens.report import plot_parts as pp  # noqa: E402
from raysens.report.plots import render_compare_plots, write_compare_plots, write_run_plots  # noqa: E402
from raysens.store.results import load_run, write_layer_stats, write_manifest  # noqa: E402
from raysens.stats.welford import WelfordState  # noqa: E402

S, B, LAYERS = 12, 30, (1, 4)


def sample_maps(s: int, b: int, layer: int, seed: int = 0) -> np.ndarray:
    """Causal [b, s, s] maps spanning several decades: diagonal, first-token column, distance decay."""
    rng = np.random.default_rng(seed + layer)
    i, j = np.indices((s, s))
    base = np.exp(-np.abs(i - j) * (1.5 - 0.1 * layer)) + 0.2 * (j == 0) + 1.5 * (i == j)
    x = base[None] * rng.lognormal(0.0, 0.4, (b, s, s))
    return np.where((j <= i)[None], x, 0.0)


def make_run(path, s=S, b=B, layers=LAYERS, seed=0, lengths=True) -> str:
    for L in layers:
        x = sample_maps(s, b, L, seed)
        mask = None
        if lengths:  # ragged samples: the last position is reached by only some of them
            n = np.random.default_rng(seed).integers(s - 3, s + 1, b)
            n[0] = s - 3  # … and row/col s-1 never by all
            pos = np.arange(s)
            mask = (pos[None, :, None] < n[:, None, None]) & (pos[None, None, :] < n[:, None, None])
        write_layer_stats(str(path), L, WelfordState.empty(s).update(x, mask, noise=0.01 * x))
    write_manifest(str(path), {
        "config": {"model": {"name": "toy"}, "data": {"source": "bundled", "max_seq_len": s},
                   "sensitivity": {"estimator": "hutchinson", "num_probes": 4}, "layers": list(layers)},
        "model": {"name": "toy", "class": "LlamaModel", "model_type": "llama", "num_hidden_layers": 6,
                  "hidden_size": 32, "parameters": 1000},
        "estimator": "hutchinson", "num_probes": 4, "seed": 0, "layers": list(layers), "max_seq_len": s,
        "samples": {"total": b + 1, "computed": b, "skipped": 1, "skipped_by_reason": {"too_short": 1},
                    "skipped_ids": {"too_short": [17]}},
        "timings": {"wall_s": 3.5, "samples_per_s": b / 3.5},
    })
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("plots") / "run")


@pytest.fixture(scope="module")
def written(run_dir):
    return write_run_plots(run_dir)


def read_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return data, mpimg.imread(io.BytesIO(data), format="png")


def assert_not_blank(img, path, min_colours=40):
    rgb = img[..., :3]
    assert rgb.std() > 0.05, f"{path}: nearly uniform image"
    colours = np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > min_colours, f"{path}: only {len(colours)} distinct colours"


def test_write_run_plots_files(run_dir, written):
    names = sorted(os.path.basename(p) for p in written)
    expected = sorted([f"layer_{L:03d}_{kind}.png" for L in LAYERS for kind in ("heatmap", "distance", "sink")]
                      + ["layers_summary.png", "decay.png"])  # decay.png: causal runs (issue 29)
    assert names == expected
    for p in written:
        assert os.path.dirname(p) == os.path.join(run_dir, "plots")
        assert os.path.getsize(p) > 8_000, f"{p} suspiciously small"


def assert_size(img, path, size, tol=0.1):
    """Pixel size within ``tol`` of the nominal figure size × dpi (tight bounding boxes trim a little)."""
    (h, w), (H, W) = img.shape[:2], size
    assert abs(h - H) <= tol * H and abs(w - W) <= tol * W, f"{path}: {w}x{h} px, expected about {W}x{H}"


@pytest.mark.parametrize("kind,size", [("heatmap", (672, 1500)), ("distance", (552, 936)), ("sink", (552, 1500))])
def test_layer_plot_dimensions_and_content(written, kind, size):
    path = next(p for p in written if p.endswith(f"layer_004_{kind}.png"))
    _, img = read_png(path)
    assert_size(img, path, size)
    assert_not_blank(img, path)
    # nothing touches the border: labels are not clipped
    edge = np.concatenate([img[:3, :, :3].reshape(-1, 3), img[-3:, :, :3].reshape(-1, 3),
                           img[:, :3, :3].reshape(-1, 3), img[:, -3:, :3].reshape(-1, 3)])
    assert edge.min() > 0.9, f"{path}: something is drawn at the image border (clipped?)"


def test_summary_plot(written):
    path = next(p for p in written if p.endswith("layers_summary.png"))
    _, img = read_png(path)
    assert_size(img, path, (912, 1440))
    assert_not_blank(img, path, min_colours=20)


def _pixel(fig, ax, rgba, row, col):
    """RGB of the rendered pixel at the centre of cell (row, col) of an imshow axis."""
    x, y = ax.transData.transform((col, row))
    h = rgba.shape[0]
    return rgba[int(round(h - y)), int(round(x)), :3] / 255.0


def test_heatmap_masks_nan_and_structural_zero_distinctly():
    m = np.array([[1e-3, 0.0, 0.0, 0.0], [1e-1, 10.0, 0.0, 0.0], [1.0, np.nan, 5.0, 0.0], [2.0, np.nan, 1e-2, 3.0]])
    cz = np.triu(np.ones((4, 4), bool), 1)
    with pp.style():
        fig, ax = pp.new_figure(4, 4)
        flags = pp.heatmap(fig, ax, m, cmap="viridis", label="x", title="t", structural_zero=cz)
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
    assert flags == {"zero": True, "nan": True, "log": True}  # 1e-3 .. 10 spans 4 decades
    zero, nan_cell, big, small = (_pixel(fig, ax, rgba, *rc) for rc in [(0, 3), (2, 1), (1, 1), (0, 0)])
    assert np.allclose(zero, 1.0, atol=0.02), "structural zeros should be white"
    assert not np.allclose(nan_cell, 1.0, atol=0.05) and np.ptp(nan_cell) < 0.1, "NaN cells: grey, not white"
    assert np.abs(big - small).sum() > 0.5, "log scale should separate 10 from 1e-3"


def test_log_scale_only_for_wide_ranges():
    assert pp.wants_log(np.array([1e-4, 1.0]))
    assert not pp.wants_log(np.array([0.5, 1.0, 20.0]))
    assert not pp.wants_log(np.array([0.0, 0.0, np.nan]))


def test_write_to_uri_and_out_dir(tmp_path):
    run = make_run(tmp_path / "small", s=6, b=5, layers=(0,))
    out = "file://" + str(tmp_path / "elsewhere")
    paths = write_run_plots("file://" + run, out_dir=out)
    assert paths and all(p.startswith(out) for p in paths)
    assert len(os.listdir(tmp_path / "elsewhere")) == len(paths)


def test_compare_plots(run_dir, tmp_path):
    pngs = render_compare_plots(run_dir, run_dir)
    assert sorted(pngs) == [f"compare_layer_{L:03d}.png" for L in LAYERS]
    other = make_run(tmp_path / "b", layers=(4, 5), seed=3)
    paths = write_compare_plots(run_dir, other, str(tmp_path / "cmp"))
    assert [os.path.basename(p) for p in paths] == ["compare_layer_004.png"]
    _, img = read_png(paths[0])
    assert_size(img, paths[0], (696, 1500))
    assert_not_blank(img, paths[0])


# ---------------------------------------------------------------------------- analysis
def test_distance_profile_known():
    m = np.array([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0], [4.0, 6.0, 5.0]])
    p = an.distance_profile(m, causal_only=True)
    assert p["d"].tolist() == [0, 1, 2]
    assert np.allclose(p["mean"], [(1 + 3 + 5) / 3, (2 + 6) / 2, 4.0])
    assert p["cells"].tolist() == [3, 2, 1]
    full = an.distance_profile(m)
    assert full["d"].tolist() == [-2, -1, 0, 1, 2] and full["mean"][0] == 0
    q = an.distance_profile(m, skip_first=True, causal_only=True)
    assert np.allclose(q["mean"], [4.0, 6.0])


def test_layer_summary_known():
    m = np.array([[1.0, 0.0, 0.0], [1.0, 3.0, 0.0], [2.0, 2.0, 4.0]])
    s = an.layer_summary(m)
    assert s["causal"] == 1.0
    assert s["diag"] == pytest.approx(7 / 2)  # causal: rows i >= 1
    assert s["row_total"] == pytest.approx((4 + 8) / 2)
    assert s["offdiag"] == pytest.approx(5 / 3)  # j < i only
    assert s["sink_share"] == pytest.approx((1 / 4 + 2 / 8) / 2)
    assert s["diag_share"] == pytest.approx((3 / 4 + 4 / 8) / 2)
    assert s["distance"] == pytest.approx((1 / 4 + (2 * 2 + 2) / 8) / 2)
    enc = an.layer_summary(np.ones((3, 3)))
    assert enc["causal"] == 0.0 and enc["offdiag"] == 1.0 and enc["sink_share"] == pytest.approx(1 / 3)


def test_top_cells_and_difference():
    m = np.arange(16, dtype=float).reshape(4, 4)
    m[3, 3] = np.nan
    top = an.top_cells(m, np.ones_like(m), 3)
    assert [(i, j) for i, j, *_ in top] == [(3, 2), (3, 1), (3, 0)]
    b = m.copy()
    b[1, 2] += 5
    d = an.difference(m, b)
    assert d["max_abs"] == 5 and an.largest_differences(d, 1)[0][:2] == (1, 2)
    assert np.nanmax(np.abs(an.difference(m, m)["diff"])) == 0


def test_plots_import_is_lazy():
    code = "import sys, raysens.report.plots, raysens.report.commands; sys.exit(int('matplotlib' in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, "importing raysens.report.plots/commands must not import matplotlib" + r.stderr


def test_loaded_run_roundtrip(run_dir):
    run = load_run(run_dir)
    assert sorted(run.layers) == list(LAYERS) and run[1].mean.shape == (S, S)


def test_many_layers_render_in_worker_processes_to_the_same_bytes(tmp_path):
    """8 layers: 2 spawn workers render a share each; every PNG equals the one-process bytes."""
    from raysens.report.plots import _workers, render_run_plots

    run = make_run(tmp_path / "run8", s=6, b=5, layers=tuple(range(1, 9)))
    assert _workers(8, 2) == 2 and _workers(8, None) >= 1 and _workers(3, 8) == 1
    one = render_run_plots(run, workers=1)
    two = render_run_plots(run, workers=2)
    assert list(one) == list(two) and len(one) == 8 * 3 + 1
    assert all(one[k] == two[k] for k in one)


def test_block_means_count_every_finite_cell():
    rng = np.random.default_rng(0)
    m = rng.lognormal(0, 2, (10, 10))
    m[np.triu_indices(10, 1)] = np.nan
    got = pp.block_means(m, 4)  # 10 -> 3 blocks, the last ones partial
    assert got.shape == (3, 3)
    for bi in range(3):
        for bj in range(3):
            blk = m[4 * bi:4 * bi + 4, 4 * bj:4 * bj + 4]
            want = np.nanmean(blk) if np.isfinite(blk).any() else np.nan
            np.testing.assert_allclose(got[bi, bj], want, rtol=1e-14, equal_nan=True)
    assert np.isnan(got[0, 2]) and np.isfinite(got[2, 0])


def test_a_long_sequence_heatmap_is_drawn_as_block_means_on_the_original_positions():
    s = 2048
    m = np.tril(np.ones((s, s))) * 1e-3
    m[1500:, :100] = 10.0  # a band every block of it must show, not every 8th row of it
    cz = np.triu(np.ones((s, s), bool), 1)
    with pp.style():
        fig, ax = pp.new_figure(4, 4)
        flags = pp.heatmap(fig, ax, m, cmap="viridis", label="x", title="t", structural_zero=cz)
        fig.canvas.draw()
    (img, *_) = ax.get_images()
    assert img.get_array().shape == (256, 256) and ax.get_title() == "t (8×8 block means)"
    assert ax.get_xlim() == (-0.5, s - 0.5) and flags["zero"] and not flags["nan"]
    a = np.ma.filled(img.get_array(), np.nan)
    np.testing.assert_allclose(a[1500 // 8 + 1:, :100 // 8], 10.0)  # the band, at full value
    np.testing.assert_allclose(a[100, 10], 1e-3)
