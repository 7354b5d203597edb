"""Hutchinson probes: drawn from a generator seeded by (run seed, sample_id, layer) only, so a
sample's result never depends on which actor, batch or retry computed it. Torch/numpy only.

Forward mode seeds one generator per input position (``position_seed``); ``position_seeds``
derives all of a sample's seeds at once (numpy's ``SeedSequence`` mixing written out over arrays
of uint32 words, the same integers as ``np.random.SeedSequence``), and ``draw_forward_probes`` /
``unit_probes`` fill whole blocks in place: the same numbers, bit for bit, as one generator and one
draw per position (the old loop), about 2x faster at d_model 1536.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..options import SEED_BOUND, ProbeDistribution, check_seed


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


# numpy's SeedSequence (numpy/random/bit_generator.pyx), pool of 4 uint32 words, over rows of words
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL = 0xCA01F9DD, 0x4973F715, 4


def _seedseq_u64(words: np.ndarray) -> np.ndarray:
    """``SeedSequence(row).generate_state(1, np.uint64)[0]`` for each row of ``words`` (uint32
    ``[n, w]``, every row of one length ``w``, no spawn key), as uint64 ``[n]``."""
    m32 = np.uint64(0xFFFFFFFF)
    words = words.astype(np.uint64)
    h = [_INIT_A]  # the hash constant: data-independent, a fixed sequence

    def hashmix(v):
        v = v ^ np.uint64(h[0])
        h[0] = (h[0] * _MULT_A) & 0xFFFFFFFF
        v = (v * np.uint64(h[0])) & m32
        return v ^ (v >> np.uint64(16))

    def mix(x, y):
        r = (np.uint64(_MIX_L) * x - np.uint64(_MIX_R) * y) & m32  # uint64 wraps mod 2**64: low word exact
        return r ^ (r >> np.uint64(16))

    n, w = words.shape
    pool = [hashmix(words[:, i] if i < w else np.zeros(n, np.uint64)) for i in range(_POOL)]
    for i_src in range(_POOL):
        for i_dst in range(_POOL):
            if i_src != i_dst:
                pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
    for i_src in range(_POOL, w):
        for i_dst in range(_POOL):
            pool[i_dst] = mix(pool[i_dst], hashmix(words[:, i_src]))
    out, hb = [], _INIT_B
    for i in range(2):  # two uint32 words, little-endian into one uint64
        v = pool[i] ^ np.uint64(hb)
        hb = (hb * _MULT_B) & 0xFFFFFFFF
        v = (v * np.uint64(hb)) & m32
        out.append(v ^ (v >> np.uint64(16)))
    return out[0] | (out[1] << np.uint64(32))


def position_seeds(seed: int, sample_id: int, positions) -> np.ndarray:
    """``position_seed(seed, sample_id, j)`` for every j of ``positions`` (int64 ``[n]``), vectorised."""
    seed, sample_id = check_seed(seed), int(sample_id)
    if sample_id < 0:
        raise ValueError(f"probe_seed: sample_id and layer must be >= 0, got {sample_id}, 0")
    pos = np.asarray(positions, np.int64)
    if pos.size and pos.min() < 0:
        raise ValueError(f"probe_seed: sample_id and layer must be >= 0, got {sample_id}, {int(pos.min())}")
    n = pos.size
    head = _entropy(seed, sample_id, 0)  # the position is the last narrow word or the 5th wide word
    words = np.tile(np.asarray(head, np.uint64), (n, 1))
    words[:, 2 if len(head) == 3 else 4] = pos.astype(np.uint64)
    base = _seedseq_u64(words) & np.uint64((1 << 63) - 1)  # probe_seed of each position
    again = np.stack([base & np.uint64(_WORD), base >> np.uint64(32), np.full(n, _FORWARD_TAG, np.uint64)], 1)
    return (_seedseq_u64(again) & np.uint64((1 << 63) - 1)).astype(np.int64)


def _fill_forward(out: torch.Tensor, dist: ProbeDistribution, seeds: np.ndarray, k: int, d_model: int) -> None:
    """``out[j]`` ``[K, d_model]`` from one generator seeded ``seeds[j]`` per position (in place)."""
    g = torch.Generator()
    if dist is ProbeDistribution.RADEMACHER:
        for j, s in enumerate(seeds.tolist()):
            torch.randint(0, 2, (k, d_model), generator=g.manual_seed(s), out=out[j])  # 0/1 as float32
        out.mul_(2).sub_(1)  # ±1 exactly
        return
    for j, s in enumerate(seeds.tolist()):
        torch.randn(k, d_model, generator=g.manual_seed(s), out=out[j])
    if dist is ProbeDistribution.SPHERE:
        out.mul_(math.sqrt(d_model) / out.norm(dim=-1, keepdim=True))


def draw_forward_probes(dist: ProbeDistribution, seed: int, sample_id: int, length: int, k: int,
                        d_model: int) -> torch.Tensor:
    """Forward-mode probes ``[pos_in=length, K, d_model]`` (float32, CPU) of one sample: position j's
    K probes come from a generator seeded by ``position_seed(seed, sample_id, j)`` only (never by
    layer, actor, batch or retry; a longer sample shares its prefix's probes)."""
    out = torch.empty(length, k, d_model)
    _fill_forward(out, dist, position_seeds(seed, sample_id, np.arange(length)), k, d_model)
    return out


def unit_probes(dist: ProbeDistribution, seed: int, sample_ids, lengths, seq: int, k: int, width: int,
                layer: int | None = None) -> torch.Tensor:
    """Probes of a batch ``[batch, S, K, width]`` (float32, CPU; zero beyond each sample's length):
    reverse mode ``draw_probes`` of ``layer`` per sample, forward mode (``layer`` None) the
    per-position probes of ``draw_forward_probes``, drawn in place."""
    p = torch.zeros(len(sample_ids), seq, k, width)  # [batch, S, K, width]
    for r, (sid, n) in enumerate(zip(np.asarray(sample_ids).tolist(), np.asarray(lengths).tolist())):
        if layer is not None:
            p[r, :n] = draw_probes(dist, seed, sid, layer, n, k, width)
        else:
            _fill_forward(p[r, :n], dist, position_seeds(seed, sid, np.arange(n)), k, width)
    return p
