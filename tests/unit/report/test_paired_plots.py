"""The paired-run heatmap (raysens/report/paired.py, issue 29): exactly the significant cells are
coloured, centred at 0; the tested but not significant ones are grey, identical ones white, untested
hatched — checked on the masked array handed to imshow and on the rendered pixels."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from paired_util import paired_samples, reference_differences  # noqa: E402
from raysens.report import paired as ppl  # noqa: E402
from raysens.report import plot_parts as pp  # noqa: E402


def _pixel(ax, rgba, row, col):
    x, y = ax.transData.transform((col, row))
    return rgba[int(round(rgba.shape[0] - y)), int(round(x)), :3] / 255.0


def _hex(c):
    import matplotlib.colors as mcolors

    return np.array(mcolors.to_rgb(c))


def test_greyed_cells_are_exactly_the_non_significant_ones():
    a, b, changed, sign = paired_samples(s=12, n=120, k_changed=15, causal=True)
    d = reference_differences(a, b)
    tested = np.isfinite(d["p"])
    sig = d["significant"]
    assert sig.any() and (tested & ~sig).any() and (~tested).any()
    with pp.style():
        fig, ax = pp.new_figure(5, 5)
        out = ppl.diff_panel(fig, ax, (d["mean_diff"], sig, tested), title="t", label="x")
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
    arr = out["images"]["diff"].get_array()
    assert np.array_equal(np.ma.getmaskarray(arr), ~sig)  # coloured: the significant cells, nothing else
    assert np.array_equal(arr.data[sig], d["mean_diff"][sig])
    norm = out["images"]["diff"].norm
    assert norm.vmin == -norm.vmax == -np.abs(d["mean_diff"][sig]).max()  # centred at 0
    assert out["images"]["diff"].get_cmap().name.startswith("RdBu_r")
    grey = np.ma.getmaskarray(out["images"]["grey"].get_array())
    assert np.array_equal(~grey, tested & ~sig)
    white = np.ma.getmaskarray(out["images"]["white"].get_array())
    assert np.array_equal(~white, ~tested)  # causal: the untested cells are j > i, D ≡ 0
    assert out["grey"] and out["white"] and not out["nan"]
    g, w = _hex(ppl.NOT_SIGNIFICANT), _hex(ppl.IDENTICAL)
    for i in range(12):
        for j in range(12):
            px = _pixel(ax, rgba, i, j)
            if sig[i, j]:
                assert not np.allclose(px, g, atol=0.03) or abs(d["mean_diff"][i, j]) < 1e-12, (i, j)
                # up is red, down is blue
                assert (px[0] > px[2]) == (d["mean_diff"][i, j] > 0), (i, j, px)
            elif tested[i, j]:
                assert np.allclose(px, g, atol=0.02), (i, j, px)
            else:
                assert np.allclose(px, w, atol=0.02), (i, j, px)


def test_untested_cells_with_a_difference_are_hatched_not_white():
    m = np.array([[1.0, np.nan], [-2.0, 0.5]])
    tested = np.array([[True, False], [True, True]])
    sig = np.array([[True, False], [True, False]])
    with pp.style():
        fig, ax = pp.new_figure(3, 3)
        out = ppl.diff_panel(fig, ax, (m, sig, tested), title="t", label="x")
    assert out == {**out, "grey": True, "white": False, "nan": True}
    assert "white" not in out["images"]


def test_a_long_map_is_drawn_as_blocks_coloured_by_their_changed_cells():
    m = np.array([[1.0, 3.0, 0.0, 0.0],
                  [2.0, 0.5, 0.0, 0.0],
                  [0.2, 0.1, 0.3, 0.0],
                  [0.4, np.nan, 0.1, 0.2]])
    tested = np.isfinite(m) & (m != 0)
    sig = np.zeros((4, 4), bool)
    sig[0, 0] = sig[0, 1] = True  # block (0, 0): mean of 1 and 3; block (1, 0): tested, none changed
    bm, bsig, btest = ppl.block_view(m, sig, tested, 2)
    assert bm[0, 0] == 2.0 and bsig.tolist() == [[True, False], [False, False]]
    assert btest.tolist() == [[True, False], [True, True]]
    assert bm[0, 1] == 0.0  # every cell identical (0): white
    assert np.isnan(bm[1, 0]) and np.isnan(bm[1, 1])  # grey (tested, nothing changed)
    with pp.style():
        fig, ax = pp.new_figure(3, 3)
        out = ppl.diff_panel(fig, ax, (bm, bsig, btest), title="t", label="x", block=2, size=4)
    assert out["images"]["diff"].get_extent() == [-0.5, 3.5, 3.5, -0.5]  # on the original positions
    assert ax.get_xlim() == (-0.5, 3.5)
    assert out["white"] and out["grey"] and not out["nan"]
