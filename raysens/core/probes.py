"""Hutchinson probes: drawn from a generator seeded by (run seed, sample_id, layer) only, so a
sample's result never depends on which actor, batch or retry computed it. Torch/numpy only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .options import ProbeDistribution


def probe_seed(seed: int, sample_id: int, layer: int) -> int:
    """Generator seed for the probes of one (run seed, sample_id, layer)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(sample_id), int(layer)])
    return int(ss.generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def draw_probes(dist: ProbeDistribution, seed: int, sample_id: int, layer: int, length: int, k: int,
                hidden: int) -> torch.Tensor:
    """Probes ``[pos_out=length, K, hidden]`` (float32, CPU) for one sample; depends only on the args."""
    g = torch.Generator().manual_seed(probe_seed(seed, sample_id, layer))
    shape = (length, k, hidden)
    if dist is ProbeDistribution.RADEMACHER:
        return torch.randint(0, 2, shape, generator=g).float().mul_(2).sub_(1)
    v = torch.randn(shape, generator=g)
    if dist is ProbeDistribution.SPHERE:
        v = v * (math.sqrt(hidden) / v.norm(dim=-1, keepdim=True))
    return v
