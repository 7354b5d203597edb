"""Issue 13 item 3: run seeds are 64-bit integers and never alias; seeds below 2**32 keep the probes
every earlier run used."""

from __future__ import annotations

import numpy as np
import pytest

from raysens.core.options import SensitivityConfig
from raysens.core.passes.probes import _entropy, draw_probes, probe_seed
from raysens.core.options import ProbeDistribution


def _old_probe_seed(seed, sample_id, layer):  # the formula of every run made before 64-bit seeds
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(sample_id), int(layer)])
    return int(ss.generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


@pytest.mark.parametrize("seed, sid, layer", [(0, 0, 0), (0, 7, 3), (123, 4567, 30), (2 ** 32 - 1, 99, 1),
                                              (1, 2 ** 32 - 1, 2)])
def test_seeds_below_2_32_keep_their_probes(seed, sid, layer):
    assert probe_seed(seed, sid, layer) == _old_probe_seed(seed, sid, layer)


def test_large_seeds_do_not_alias_small_ones():
    cases = [(0, 0, 0), (2 ** 32, 0, 0), (1, 0, 0), (0, 1, 0), (2 ** 32 - 1, 0, 0), (2 ** 64 - 1, 0, 0),
             (2 ** 32 + 1, 0, 0), (2 ** 33, 0, 0), (0, 1, 0), (0, 0, 1),
             # numpy would split 2**32 into the words [0, 1]: [2**32, 0, 0] == [0, 1, 0, 0] ~ seed 0, sample 1
             (0, 1, 0), (2 ** 32, 1, 0), (1, 2 ** 32, 0), (0, 2 ** 32, 1), (0, 2 ** 32, 0), (2 ** 32, 0, 1),
             (0x52534E53, 0, 0), (5, 0, 0x52534E53)]
    cases = list(dict.fromkeys(cases))
    seeds = [probe_seed(*c) for c in cases]
    assert len(set(seeds)) == len(cases)
    words = [tuple(_entropy(*c)) for c in cases]
    assert len(set(words)) == len(cases)  # the entropies themselves differ (the injectivity argument)
    assert all(len(w) == 6 and w[-1] != 0 for c, w in zip(cases, words) if max(c) >= 2 ** 32)
    p0 = draw_probes(ProbeDistribution.RADEMACHER, 0, 0, 0, 8, 1, 16)
    p32 = draw_probes(ProbeDistribution.RADEMACHER, 2 ** 32, 0, 0, 8, 1, 16)
    assert not np.array_equal(p0.numpy(), p32.numpy())


@pytest.mark.parametrize("bad", [1.5, -1, 2 ** 64, "3", True, float("nan")])
def test_non_integer_or_out_of_range_seeds_are_refused(bad):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        SensitivityConfig(seed=bad)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        probe_seed(bad, 0, 0)


def test_numpy_integer_seeds_are_accepted():
    assert SensitivityConfig(seed=np.uint64(2 ** 64 - 1)).seed == 2 ** 64 - 1
    assert probe_seed(np.int64(5), np.int64(3), 1) == _old_probe_seed(5, 3, 1)
