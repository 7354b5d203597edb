"""The per-actor memory model (``raysens.core.memory.sizing``) and the CUDA budget of ``MemoryPolicy``, with
the CUDA memory queries mocked: the budget counts the caching allocator's free-but-reserved blocks,
stays the same across consecutive units, and the per-row calibration neither keeps an old maximum
forever nor counts memory that stays allocated (a bf16 weight copy) as per-row memory."""

from __future__ import annotations

import pytest
import torch

from raysens.core.memory import budget as memmod
from raysens.core.memory.budget import CUDA_FRACTION, MemoryPolicy, device_budget
from raysens.core.memory.sizing import CELL_STATE_BYTES, ModelShape, Workload, pass_bytes, plan_unit, sums_bytes

GiB = 1 << 30


class FakeCuda:
    """The five CUDA memory queries the policy makes, as plain numbers a test moves."""

    def __init__(self, monkeypatch, free, reserved, allocated):
        self.free, self.reserved, self.allocated, self.peak = free, reserved, allocated, allocated
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "mem_get_info", lambda d=None: (self.free, 80 * GiB))
        monkeypatch.setattr(cuda, "memory_reserved", lambda d=None: self.reserved)
        monkeypatch.setattr(cuda, "memory_allocated", lambda d=None: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda d=None: self.peak)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda d=None: setattr(self, "peak", self.allocated))


def test_cuda_budget_counts_reserved_free_blocks(monkeypatch):
    fake = FakeCuda(monkeypatch, free=10 * GiB, reserved=6 * GiB, allocated=4 * GiB)
    want = int(CUDA_FRACTION * (10 * GiB + 2 * GiB))
    assert device_budget("cuda") == want
    assert MemoryPolicy(torch.device("cuda")).budget_bytes() == want
    assert device_budget("cuda", memory_budget_mb=100) == 100 << 20  # explicit wins
    assert device_budget("cpu") == 2048 << 20
    # after a unit: the allocator keeps 8 GiB more reserved (free drops by as much), allocated is back
    fake.free, fake.reserved = 2 * GiB, 14 * GiB
    assert device_budget("cuda") == want  # stable: the old mem_get_info()[0] // 2 fell from 5 to 1 GiB
    fake.allocated = 5 * GiB  # one more GiB live (a pass's sums): one GiB less to use
    assert device_budget("cuda") == int(CUDA_FRACTION * 11 * GiB)


def test_calibration_excludes_kept_memory_and_follows_the_last_call(monkeypatch):
    fake = FakeCuda(monkeypatch, free=40 * GiB, reserved=0, allocated=1000)
    mem = MemoryPolicy(torch.device("cuda"))
    mem.reset_record()
    base = mem.mark()
    # a chunk of 100 row-tokens peaks 50 bytes per row-token above base, and leaves a 400-byte bf16
    # weight copy allocated (made on first use): 50, not 54
    fake.peak = base + 400 + 50 * 100
    fake.allocated = base + 400
    mem.calibrate(base, 100)
    assert mem.row_token_bytes == 50
    base = mem.mark()
    fake.peak = base + 80 * 100  # a bigger chunk in the same call raises it
    mem.calibrate(base, 100)
    assert mem.row_token_bytes == 80
    mem.reset_record()  # next unit: starts from the last call's largest
    assert mem.row_token_bytes == 80
    base = mem.mark()
    fake.peak = base + 30 * 100
    mem.calibrate(base, 100)
    assert mem.row_token_bytes == 80  # within a call never below the starting figure
    mem.reset_record()
    assert mem.row_token_bytes == 30  # ... but an old maximum is not kept forever
    mem.reset_record()
    assert mem.row_token_bytes == 30  # a call that measured nothing keeps it


def test_passes_take_half_the_budget_and_respect_the_cap(monkeypatch):
    FakeCuda(monkeypatch, free=int(10 * GiB / CUDA_FRACTION) + 1, reserved=0, allocated=0)
    mem = MemoryPolicy(torch.device("cuda"))
    assert mem.passes(32, GiB) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30), (30, 32)]
    assert mem.passes(3, 100 * GiB) == [(0, 1), (1, 2), (2, 3)]  # at least one sample
    mem.after_split(2, 32, [(0, 5), (5, 10)])
    assert mem.pass_cap == 2 and mem.passes(6, 1) == [(0, 2), (2, 4), (4, 6)]
    cpu = MemoryPolicy(torch.device("cpu"), memory_budget_mb=1)
    assert cpu.passes(32, GiB) == [(0, 32)]  # CPU: the sums are the host's either way


def test_pass_and_sums_bytes_arithmetic():
    assert sums_bytes(2048, 28, 1) == 8 * 2048 * 2048 * 28 == 939_524_096
    assert sums_bytes(512, 28, 2) == 2 * 8 * 512 * 512 * 28
    # reverse: one probe tensor per target layer [S, K, H]; forward: one [S, K, D]
    assert pass_bytes(1000, 10, 2, 8, 3, 7) == 1000 + 4 * 10 * 2 * 8 * 3 + 7
    assert pass_bytes(1000, 10, 0, 8, 3, 0) == 1000


QWEN15 = ModelShape(params=1_543_714_304, param_bytes=4 * 1_543_714_304, d_model=1536, hidden=1536, n_layers=28,
                    heads=12, intermediate=8960)


def test_plan_on_cpu_s512_fits_and_sizes_the_unit():
    p = plan_unit(QWEN15, Workload(seq=512, target_layers=28, k=1, mode="forward", manual=False), budget=4 * GiB)
    sums = 8 * 512 * 512 * 28  # 58.7 MB
    state = CELL_STATE_BYTES * 512 * 512 * 28  # 1.57 GB
    probes = 4 * 512 * 1 * 1536
    per_unit = sums + 512 * 512 + 8 * 512 * 512 + probes
    fold_one = 3 * 8 * 512 * 512 * 28
    unit = (4 * GiB - state - (256 << 20) - fold_one) // per_unit
    assert p.fits and p.state_bytes == state and p.unit_bytes_per_sample == per_unit
    assert p.samples_per_unit == min(64, unit) == 35 and p.samples_per_pass == p.samples_per_unit
    left = 4 * GiB - state - (256 << 20) - unit * per_unit
    assert p.samples_per_fold == max(1, min(unit, left // fold_one)) >= 1
    # peak host bytes of the plan stay within the budget
    assert state + (256 << 20) + p.samples_per_unit * per_unit + p.samples_per_fold * fold_one <= 4 * GiB


def test_plan_s2048_28_layers_does_not_fit_4gib_and_says_why():
    p = plan_unit(QWEN15, Workload(seq=2048, target_layers=28, k=1, mode="forward"), budget=4 * GiB)
    assert not p.fits and p.samples_per_unit == 1
    assert "state 23968 MiB" in p.reason and "max_seq_len" in p.reason and "\n" not in p.reason
    # without the state (a state kept elsewhere: state_cell_bytes=0) one sample's unit fits 4 GiB
    p = plan_unit(QWEN15, Workload(seq=2048, target_layers=28, k=1, mode="forward", state_cell_bytes=0, manual=False),
                  budget=4 * GiB)
    assert p.fits and p.samples_per_unit == 1


def test_plan_on_gpu_counts_the_pass_inside_the_device_budget():
    # Llama-3-8B shape, S=1024, 32 target layers, K=2, 60 GiB left on an 80 GB card, 200 GiB host
    llama8 = ModelShape(8_030_261_248, 2 * 8_030_261_248, 4096, 4096, 32, 32, 14336)
    kw = dict(budget=60 * GiB, device_type="cuda", host_budget=200 * GiB)

    def work(seq):
        return Workload(seq=seq, target_layers=32, k=2, mode="reverse", state_cell_bytes=0)

    p = plan_unit(llama8, work(1024), **kw)
    # sums (total + sumsq), one probe tensor [S, K, H] per target layer, the shared forward (scores: heads·S²)
    per_pass = 2 * 8 * 1024 * 1024 * 32 + 4 * 1024 * 2 * 4096 * 32 + 4 * 32 * 1024 * (5 * 4096 + 32 * 1024 + 2 * 14336 + 2)
    assert p.pass_bytes_per_sample == per_pass == 12_348_293_120
    assert p.samples_per_pass == (30 * GiB) // per_pass == 2 and p.fits
    assert p.samples_per_unit >= p.samples_per_pass
    # weights counted when planning before the load: (60 GiB − 16 GB) / 2 holds 1
    q = plan_unit(llama8, work(1024), weights_on_budget=True, **kw)
    assert q.samples_per_pass == (60 * GiB - llama8.param_bytes) // 2 // per_pass == 1
    # S=2048: one sample's pass (34 GB, 16 GiB of it attention scores) fits 3/4 of 60 GiB, alone
    r = plan_unit(llama8, work(2048), **kw)
    assert r.samples_per_pass == 1 and r.fits and r.pass_bytes_per_sample > 30 * GiB
    s = plan_unit(llama8, work(2048), **{**kw, "budget": 40 * GiB})
    assert not s.fits and "device: one sample's pass" in s.reason


def test_shape_from_a_model():
    from refs import tiny_model

    m = tiny_model("llama")
    s = ModelShape.from_model(m)
    assert s.params == sum(p.numel() for p in m.parameters()) and s.param_bytes == 4 * s.params
    assert (s.d_model, s.n_layers) == (m.config.hidden_size, m.config.num_hidden_layers)
    assert memmod.CPU_BUDGET == 2048 << 20
