"""Issue 31, overlap (2): thread CPU (``time.thread_time``) and minor page faults of the bookkeeping's
pieces, the old way and the new alternated in one process (min of 3 reps): ``kernel.update_cells``
with whole-batch temporaries (old: one block) against cell blocks (new); the npz of the state through
``np.lib.format.write_array`` (old: ``tobytes`` copies) against ``npz_bytes`` (views); the boolean row
copy ``values[good]`` (old) against none (new). S = 512, 4 samples, LAYERS layers (default 4).

    python -m jobs.bench.overlap_pieces [LAYERS]
"""

from __future__ import annotations

import io
import sys
import time
import zipfile

import numpy as np

from jobs.harness import log, thread_minflt

S, B = 512, 4


def measure(fn):
    """(thread CPU seconds, minor page faults) of ``fn()`` on the calling thread."""
    c, f = time.thread_time(), thread_minflt()
    fn()
    return time.thread_time() - c, thread_minflt() - f


def ref_npz(arrays):
    """The old npz writer (``np.lib.format.write_array``: ``tobytes`` copies)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k, v in arrays.items():
            with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=False)
    return buf.getvalue()


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    from raysens.stats import kernel
    from raysens.stats.cells import CellStats, warm_kernel
    from raysens.store import npz
    from raysens.store.codec import pack_state

    warm_kernel()
    L = int(argv[0]) if argv else 4
    rng = np.random.default_rng(0)
    causal = np.tril(np.ones((S, S)))
    maps = [rng.gamma(1.0, 1.0 + l, (B, S, S)) * causal for l in range(L)]
    mask = np.ones((B, S, S), bool)
    ids = np.arange(B)
    good = np.ones(B, bool)
    states = [CellStats.empty(S).update(CellStats.check(m, mask, None, ids)) for m in maps]
    res = {k: [] for k in ("fold_old", "fold_new", "rows_old", "rows_new", "npz_old", "npz_new")}
    default_block = kernel._BLOCK_VALUES
    try:
        for rep in range(3):
            for mode in ("old", "new"):
                kernel._BLOCK_VALUES = 1 << 40 if mode == "old" else default_block

                def fold():
                    for m, st in zip(maps, states):
                        st.update(CellStats.check(m, mask, None, ids))
                res["fold_" + mode].append(measure(fold))
                res["rows_" + mode].append(measure(lambda: [m[good] if mode == "old" else m for m in maps]))
            arrays = {f"L{i}_{k}": v for i, st in enumerate(states) for k, v in pack_state(st, ids).items()}
            for mode, fn in (("old", ref_npz), ("new", npz.npz_bytes)):
                out = []
                res["npz_" + mode].append(measure(lambda: out.append(fn(arrays))))
            assert len(set(len(o) for o in [ref_npz(arrays), npz.npz_bytes(arrays)])) == 1
    finally:
        kernel._BLOCK_VALUES = default_block
    log(f"layers {L}, S {S}, batch {B}; min over 3 reps of (thread CPU s, minor faults); per layer-fold / "
        f"per layer-encode")
    summary = {}
    for k, v in res.items():
        c = min(x[0] for x in v)
        f = min(x[1] for x in v)
        summary[k] = {"cpu_s": c, "faults": f}
        log(f"  {k:9s} cpu {c:7.3f} s ({c / L * 1000:6.1f} ms/layer)  faults {f:8d} ({f // L}/layer)")
    return summary


if __name__ == "__main__":
    main()
