"""Hutchinson probes: drawn from a generator seeded by (run seed, sample_id, layer) only, so a
sample's result never depends on which actor, batch or retry computed it. Torch/numpy only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .options import SEED_BOUND, ProbeDistribution, check_seed


_WORD = (1 << 32) - 1
_WIDE_TAG = 0x52534E53  # "RSNS": marks the 6-word entropy of the wide scheme (nonzero, see below)


def _entropy(seed: int, sample_id: int, layer: int) -> list[int]:
    """The SeedSequence entropy of one (seed, sample_id, layer): a list of 32-bit words.

    - Narrow scheme, seed, sample_id and layer all < 2**32: ``[seed, sample_id, layer]`` — exactly
      the probes of every run made before 64-bit seeds existed.
    - Wide scheme, anything else (seed or sample_id >= 2**32; sample_id < 2**64, layer < 2**32):
      ``[seed_lo, seed_hi, sid_lo, sid_hi, layer, TAG]`` with a fixed nonzero TAG.

    Injectivity (different triples give different word lists, hence different SeedSequences):
    within the narrow scheme each position holds one value < 2**32 verbatim; within the wide scheme
    every value is written at a fixed position in fixed-width words. Across schemes the lengths
    differ (3 vs 6). numpy pads an entropy shorter than its pool (4 words) with zeros, so ``[a,b,c]``
    and ``[a,b,c,0]`` mix alike — hence the wide scheme has 6 words ending in a *nonzero* tag: no
    zero-padding of a 3-word list can equal it. (numpy itself would split a big int into 32-bit
    words, so the naive ``[2**32, 0, 0]`` is the list ``[0, 1, 0, 0]`` = ``[0, 1, 0]`` padded, i.e.
    seed 0's probes of sample 1 — the wide scheme never hands numpy an int >= 2**32.)
    """
    if seed < (1 << 32) and sample_id < (1 << 32) and layer < (1 << 32):
        return [seed, sample_id, layer]
    if not 0 <= sample_id < SEED_BOUND or not 0 <= layer < (1 << 32):
        raise ValueError(f"probe_seed: sample_id must be in [0, 2**64) and layer in [0, 2**32), "
                         f"got {sample_id}, {layer}")
    return [seed & _WORD, seed >> 32, sample_id & _WORD, sample_id >> 32, layer, _WIDE_TAG]


def probe_seed(seed: int, sample_id: int, layer: int) -> int:
    """Generator seed for the probes of one (run seed, sample_id, layer); ``seed`` in [0, 2**64)."""
    seed = check_seed(seed)
    sample_id, layer = int(sample_id), int(layer)
    if sample_id < 0 or layer < 0:
        raise ValueError(f"probe_seed: sample_id and layer must be >= 0, got {sample_id}, {layer}")
    ss = np.random.SeedSequence(_entropy(seed, sample_id, layer))
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


_FORWARD_TAG = 0x46574450  # "FWDP": separates forward-mode (input-position) seeds from layer seeds


def position_seed(seed: int, sample_id: int, position: int) -> int:
    """Generator seed for the forward-mode probes of one (run seed, sample_id, input position j).

    Derived from ``probe_seed(seed, sample_id, position)`` (same seed checks and 64-bit seeds) mixed
    again with a fixed tag, so it differs from the reverse-mode seed of a layer with that index."""
    base = probe_seed(seed, sample_id, position)
    ss = np.random.SeedSequence([base & 0xFFFFFFFF, base >> 32, _FORWARD_TAG])
    return int(ss.generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def draw_forward_probes(dist: ProbeDistribution, seed: int, sample_id: int, length: int, k: int,
                        d_model: int) -> torch.Tensor:
    """Forward-mode probes ``[pos_in=length, K, d_model]`` (float32, CPU) of one sample: position j's
    K probes come from a generator seeded by ``position_seed(seed, sample_id, j)`` only (never by
    layer, actor, batch or retry; a longer sample shares its prefix's probes)."""
    out = torch.empty(length, k, d_model)
    for j in range(length):
        g = torch.Generator().manual_seed(position_seed(seed, sample_id, j))
        if dist is ProbeDistribution.RADEMACHER:
            out[j] = torch.randint(0, 2, (k, d_model), generator=g).float().mul_(2).sub_(1)
        else:
            v = torch.randn(k, d_model, generator=g)
            out[j] = v * (math.sqrt(d_model) / v.norm(dim=-1, keepdim=True)) if dist is ProbeDistribution.SPHERE else v
    return out
