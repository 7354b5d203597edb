"""Writing ``.npz`` archives fast: zlib level 1 instead of ``np.savez_compressed``'s default level.

``np.load`` reads the result as any ``.npz``; only the bytes differ (a partial's or checkpoint's file
name hashes its bytes, so names change with the level, contents never). Measured (docs/benchmarks.md,
issue 18): a 28-layer S = 64 partial (23.8 MB of arrays) compresses to 4.78 MB in 0.19 s CPU at
level 1 against 4.36 MB in 0.94 s at the default level; an S = 512 stats file: 18.5 MB in 0.59 s
against 17.3 MB in 1.73 s. numpy only.
"""

from __future__ import annotations

import io
import zipfile
from typing import Mapping

import numpy as np


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of an npz of ``arrays`` (name -> array, no pickles) at zlib level 1: partials,
    checkpoints and stats files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k, v in arrays.items():
            with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=False)
    return buf.getvalue()
