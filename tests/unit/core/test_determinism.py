"""``raysens.core.passes.determinism``: the CPU softmax backward the generic paths use gives the same bits for
1 and 2 torch threads inside ``thread_independent``, equals torch's kernel to rounding, and torch's own
kernel is back outside the block (a caller's model behaves as before)."""

from __future__ import annotations

import torch

from raysens.core.passes.determinism import thread_independent

SHAPES = [(1, 4, 9, 9), (3, 4, 9, 17), (12, 9, 9), (2, 12, 33, 33), (2, 3, 100, 100)]


def _inputs(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    o = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(2)), -1)
    return g, o


def _at_threads(threads: int, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn()
    finally:
        torch.set_num_threads(before)


def test_softmax_backward_is_thread_count_independent_and_right():
    for shape in SHAPES:
        g, o = _inputs(shape)
        native = torch._softmax_backward_data(g, o, -1, torch.float32)
        with thread_independent("cpu"):
            one, two = (_at_threads(t, lambda: torch._softmax_backward_data(g, o, -1, torch.float32)) for t in (1, 2))
        assert torch.equal(one, two), shape
        ref = (o.double() * (g.double() - (g.double() * o.double()).sum(-1, keepdim=True))).float()
        torch.testing.assert_close(one, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(native, ref, rtol=1e-6, atol=1e-7)


def test_torch_kernel_is_back_after_the_block_and_blocks_nest():
    from raysens.core.passes import determinism

    g, o = _inputs((1, 4, 9, 9))
    before = torch._softmax_backward_data(g, o, -1, torch.float32)
    with thread_independent("cpu"):
        inside = torch._softmax_backward_data(g, o, -1, torch.float32)
        with thread_independent("cpu"):
            assert determinism._STATE["depth"] == 2
        assert torch.equal(torch._softmax_backward_data(g, o, -1, torch.float32), inside)  # still ours
    after = torch._softmax_backward_data(g, o, -1, torch.float32)
    assert torch.equal(inside, o * (g - (g * o).sum(-1, keepdim=True)))
    assert torch.equal(after, before) and determinism._STATE == {"depth": 0, "lib": None}
    # on CPUs where torch's kernel rounds this shape differently from the formula (AVX2), the values
    # show that torch's kernel is back after the block
    assert torch.equal(before, inside) or not torch.equal(after, inside)


def test_other_devices_are_left_alone():
    from raysens.core.passes import determinism

    with thread_independent("meta"):
        assert determinism._STATE["depth"] == 0
